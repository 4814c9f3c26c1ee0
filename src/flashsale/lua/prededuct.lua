-- Pre-deduct stock for one purchase, atomically. The local transaction of the producer.
--
-- KEYS[1] fs:{sku}:stock  remaining stock (integer string)
-- KEYS[2] fs:{sku}:log    hash token -> JSON log entry
-- KEYS[3] fs:{sku}:users  hash user -> quantity bought (kept only when a per-user limit is set)
-- KEYS[4] fs:{sku}:meta   hash: initial, per_user_limit, sold_out, counters
-- ARGV[1] token       idempotency token
-- ARGV[2] user id
-- ARGV[3] quantity    decimal digits, 1..999999999
-- ARGV[4] message id  of the half message this deduction belongs to
-- ARGV[5] sku         (written into the log entry; the keys already name it)
--
-- Returns {code, remaining, detail}:
--   1 accepted        remaining after the deduction, detail = the new log entry
--   2 duplicate       token seen before with state deducted/returned; detail = that entry
--   3 sold out        remaining = 0
--   4 insufficient    0 < remaining < qty
--   5 limit exceeded  detail = quantity the user already bought
--   6 invalid qty
--   7 unknown sku     the SKU was never loaded
--   8 fenced          the checker rolled this token back; detail = the fence entry
-- Every check runs before the first write, so an error never leaves a partial deduction.
local stock_key, log_key, users_key, meta_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token, user, qty_arg, message_id, sku = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]

if not string.match(qty_arg, '^[1-9]%d*$') or #qty_arg > 9 then
  return {6, -1, ''}
end
local qty = tonumber(qty_arg)

local seen = redis.call('HGET', log_key, token)
local stock_raw = redis.call('GET', stock_key)
local remaining = tonumber(stock_raw or '-1')
if seen then
  if cjson.decode(seen)['state'] == 'fenced' then
    return {8, remaining, seen}
  end
  return {2, remaining, seen}
end
if not stock_raw then
  return {7, -1, ''}
end
if remaining < qty then
  if remaining == 0 then
    return {3, 0, ''}
  end
  return {4, remaining, ''}
end

local limit = tonumber(redis.call('HGET', meta_key, 'per_user_limit') or '0') or 0
if limit > 0 then
  local bought = tonumber(redis.call('HGET', users_key, user) or '0')
  if bought + qty > limit then
    return {5, remaining, tostring(bought)}
  end
end

-- All checks passed: write.
local now = redis.call('TIME')
local left = remaining - qty
local entry = cjson.encode({
  state = 'deducted', sku = sku, user = user, qty = qty,
  from = remaining, to = left,
  ts = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000),
  msg = message_id,
})
redis.call('SET', stock_key, left)
redis.call('HSET', log_key, token, entry)
if limit > 0 then
  redis.call('HINCRBY', users_key, user, qty)
end
redis.call('HINCRBY', meta_key, 'deducted_qty', qty)
redis.call('HINCRBY', meta_key, 'deducted_count', 1)
if left == 0 then
  redis.call('HSET', meta_key, 'sold_out', 1)
end
return {1, left, entry}
