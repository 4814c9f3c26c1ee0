-- The checker's verdict on a token whose half message has waited too long: read the log entry and,
-- if there is none, write a fence in the same step so that a late pre-deduct finds it and refuses.
--
-- KEYS[1] fs:{sku}:log   hash token -> JSON log entry
-- KEYS[2] fs:{sku}:meta  hash: counters
-- ARGV[1] token
-- ARGV[2] sku
-- ARGV[3] user id
-- ARGV[4] quantity (as sent in the half message)
--
-- Returns {state, entry}: state is 'deducted' or 'returned' (commit), or 'fenced' (roll back).
local log_key, meta_key = KEYS[1], KEYS[2]
local token, sku, user, qty = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local seen = redis.call('HGET', log_key, token)
if seen then
  return {cjson.decode(seen)['state'], seen}
end
local now = redis.call('TIME')
local entry = cjson.encode({
  state = 'fenced', sku = sku, user = user, qty = tonumber(qty) or 0,
  ts = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000),
})
redis.call('HSET', log_key, token, entry)
redis.call('HINCRBY', meta_key, 'fenced_count', 1)
return {'fenced', entry}
