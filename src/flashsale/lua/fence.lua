-- The checker's look at a half message: did its pre-deduct run, and which purchases did it deduct?
-- When it never ran and the message is older than the grace period, a fence is written in the same
-- step, so that a late pre-deduct of this message finds it and deducts nothing.
--
-- KEYS[1] fs:{sku}:tx    hash message id -> JSON record of that message's pre-deduct
-- KEYS[2] fs:{sku}:log   hash token -> JSON log entry
-- KEYS[3] fs:{sku}:meta  hash: counters (fenced_count)
-- ARGV[1] message id
-- ARGV[2] the message's born time, ms since the epoch
-- ARGV[3] grace, ms: a younger message may still be in its producer's hands
-- ARGV[4..] the tokens the message carries
--
-- Returns {state, record, entry...}: state is 'ran', 'fenced' (now or before) or 'young' (nothing
-- written); one log entry (or false) per token of ARGV[4..]. Age is measured on Redis's clock, so
-- checkers on hosts with skewed clocks agree. A decided answer always writes (a counter when the record
-- was there already): replication is one ordered stream, so a WAIT on this script's connection then
-- proves a replica holds the record and the entries it answers from.
local tx_key, log_key, meta_key = KEYS[1], KEYS[2], KEYS[3]
local gid, born, grace = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

local function entries(state, record)
  local out = {state, record}
  for i = 4, #ARGV do
    out[#out + 1] = redis.call('HGET', log_key, ARGV[i])
  end
  return out
end

local record = redis.call('HGET', tx_key, gid)
if record then
  if redis.call('EXISTS', meta_key) == 1 then
    redis.call('HINCRBY', meta_key, 'checks', 1)
  end
  return entries(cjson.decode(record)['state'], record)
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if now_ms - born < grace then
  return entries('young', '')
end
record = cjson.encode({state = 'fenced', ts = now_ms})
redis.call('HSET', tx_key, gid, record)
if redis.call('EXISTS', meta_key) == 1 then
  redis.call('HINCRBY', meta_key, 'fenced_count', 1)
end
return entries('fenced', record)
