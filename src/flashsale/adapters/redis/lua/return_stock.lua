-- Give the stock of a cancelled purchase back, once per token.
--
-- KEYS[1] fs:{sku}:stock
-- KEYS[2] fs:{sku}:log
-- KEYS[3] fs:{sku}:users
-- KEYS[4] fs:{sku}:meta
-- ARGV[1] token
--
-- Returns {code, remaining, entry}:
--   1 returned          stock given back; entry = the updated log entry
--   2 already returned  nothing changed
--   3 not deducted      no log entry, or a fence: there is nothing to give back
-- include: give_back

-- include: clock
local stock_key, log_key, users_key, meta_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token = ARGV[1]

local seen = redis.call('HGET', log_key, token)
local remaining = tonumber(redis.call('GET', stock_key) or '-1')
if not seen then
  return {3, remaining, ''}
end
local entry = cjson.decode(seen)
if entry['state'] == 'returned' then
  return {2, remaining, seen}
end
if entry['state'] ~= 'deducted' or remaining < 0 or type(entry['order']) == 'string' then
  -- (An order awaiting payment, or decided, gives its units back through decide.lua alone.)
  return {3, remaining, seen}
end

local now_ms = clock_ms()
local left = give_back(stock_key, users_key, meta_key, entry)
entry['returned_ts'] = now_ms
local updated = cjson.encode(entry)
redis.call('HSET', log_key, token, updated)
return {1, left, updated}
