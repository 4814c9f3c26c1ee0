-- The checker's look at a half message: did its pre-deduct run, and which purchases did it deduct?
-- When it never ran and the broker has asked about it for longer than the grace period, a fence is
-- written in the same step, so that a late pre-deduct of this message finds it and deducts nothing.
--
-- KEYS[1] fs:{sku}:tx      hash message id -> JSON record of that message's pre-deduct
-- KEYS[2] fs:{sku}:log     hash token -> JSON log entry
-- KEYS[3] fs:{sku}:meta    hash: counters (fenced_count, checks)
-- KEYS[4] fs:{sku}:checks  hash message id -> when a check first found no record (ms, Redis's clock)
-- ARGV[1] message id
-- ARGV[2] grace, ms: a message first asked about more recently may still be in its producer's hands
-- ARGV[3..] the tokens the message carries
--
-- Returns {state, record, entry...}: state is 'ran', 'stale' (refused as another load's: it ran
-- nothing), 'fenced' (now or before) or 'young' (nothing decided); one log entry (or false) per token.
--
-- Age is measured on Redis's clock alone, from the first check that found no record: neither the
-- producer's clock (the message's born time) nor the checker's enters it, so hosts with skewed clocks
-- agree. The broker asks only once a message is older than its own transaction timeout. On keys that
-- are gone (a partition a new load dropped) no pre-deduct can ever run: the fence is written at once,
-- and those keys expire.
--
-- A decided answer always writes (a counter when the record was there already): replication is one
-- ordered stream, so a WAIT on this script's connection then proves a replica holds the record and the
-- entries it answers from.
-- include: clock
local tx_key, log_key, meta_key, checks_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local gid, grace = ARGV[1], tonumber(ARGV[2])
local DAY_MS = 86400000

local function entries(state, record)
  local out = {state, record}
  for i = 3, #ARGV do
    out[#out + 1] = redis.call('HGET', log_key, ARGV[i])
  end
  return out
end

local live = redis.call('EXISTS', meta_key) == 1
local function count(field)
  if live then
    redis.call('HINCRBY', meta_key, field, 1)
  else
    redis.call('PEXPIRE', tx_key, DAY_MS)
  end
end

local record = redis.call('HGET', tx_key, gid)
if record then
  count('checks')
  redis.call('HDEL', checks_key, gid)
  return entries(cjson.decode(record)['state'], record)
end
local now_ms = clock_ms()
if live then
  local first = tonumber(redis.call('HGET', checks_key, gid) or '')
  if not first then
    first = now_ms
    redis.call('HSET', checks_key, gid, now_ms)
  end
  if now_ms - first < grace then
    return entries('young', '')
  end
end
record = cjson.encode({state = 'fenced', ts = now_ms})
redis.call('HSET', tx_key, gid, record)
redis.call('HDEL', checks_key, gid)
count('fenced_count')
return entries('fenced', record)
