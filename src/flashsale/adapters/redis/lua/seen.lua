-- The log entries of some tokens, read so that a replica is known to hold them: the script writes (a
-- counter), and replication is one ordered stream, so a WAIT after it on its connection proves that a
-- replica holds everything it read. A token answered `duplicate` from these entries cannot lose its
-- deduction in a failover.
--
-- KEYS[1] fs:{sku}:log   hash token -> JSON log entry
-- KEYS[2] fs:{sku}:meta  counters (confirms)
-- ARGV[1] ARGV[2] ... the tokens
--
-- Returns one entry (or false) per token. On keys that are gone it reads nothing and writes nothing.
local log_key, meta_key = KEYS[1], KEYS[2]
local out = {}
if redis.call('EXISTS', meta_key) == 0 then
  for i = 1, #ARGV do
    out[i] = false
  end
  return out
end
redis.call('HINCRBY', meta_key, 'confirms', 1)
for i = 1, #ARGV do
  out[i] = redis.call('HGET', log_key, ARGV[i])
end
return out
