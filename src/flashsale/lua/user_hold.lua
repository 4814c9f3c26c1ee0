-- The per-user limit of a partitioned SKU: a hold per token on the buyer's count, taken before the
-- purchase goes to its partition (whose own script sees one slot, and so cannot count the others).
--
-- KEYS[1] fs:{#users:n}:sku:epoch  hash b:user -> units held by the user, h:token -> units of that token
--                                  (users sharded by their crc32; a new load of the SKU starts new keys)
-- ARGV[1] the per-user limit
-- ARGV[2..] token, user id, quantity: one triple per purchase
--
-- Returns a flat array, {code, detail} per purchase: 1 held (now, or by an earlier attempt of the token:
-- a retry never counts twice), 5 limit exceeded (detail: the units the user holds). A hold is kept
-- whatever the purchase's outcome: the count can run ahead of the orders (a buyer who gives up on an
-- unclear answer), never behind them.
local key, limit = KEYS[1], tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV - 2, 3 do
  local token, user, qty = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  if redis.call('HEXISTS', key, 'h:' .. token) == 1 then
    out[#out + 1] = 1
    out[#out + 1] = ''
  else
    local held = tonumber(redis.call('HGET', key, 'b:' .. user) or '0')
    if held + qty > limit then
      out[#out + 1] = 5
      out[#out + 1] = tostring(held)
    else
      redis.call('HSET', key, 'h:' .. token, qty)
      redis.call('HINCRBY', key, 'b:' .. user, qty)
      out[#out + 1] = 1
      out[#out + 1] = ''
    end
  end
end
return out
