-- The per-user limit of a partitioned SKU: a hold per token and user on the buyer's count, taken before
-- the purchase goes to its partition (whose own script sees one slot, and so cannot count the others).
--
-- KEYS[1] fs:{#users:n}:sku:epoch  hash b:user -> units held by the user; h:token -> JSON {user: units}
--                                  (users sharded by their crc32; a new load of the SKU starts new keys)
-- ARGV[1] the per-user limit
-- ARGV[2..] token, user id, quantity: one triple per purchase
--
-- Returns a flat array, {code, detail} per purchase: 1 held, 5 limit exceeded (detail: the units the
-- user holds).
--
-- A token is deducted once at most, at one of the quantities it was sent with. So a user's hold on a
-- token is the largest quantity the user sent it with: a retry at that quantity or less counts nothing
-- more, a retry asking for more holds the difference (within the limit), and the same token sent by
-- another user holds on that user's count. A user is never sold more than the limit. A hold is kept
-- whatever the purchase's outcome, and whatever becomes of its order (cancelled or expired, its units
-- back on sale): the count can run ahead of the orders (a buyer who gives up on an unclear answer, or
-- lets an order go), never behind them. So a buyer whose order is cancelled or expires does not get that
-- share of the limit back; on a SKU on one key decide.lua frees it, the count being on the order's slot.
--
-- Every call writes (a counter at least), so that a WAIT after it proves a replica holds the holds.
local key, limit = KEYS[1], tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV - 2, 3 do
  local token, user, qty = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local raw = redis.call('HGET', key, 'h:' .. token)
  local holds = {}
  if raw and string.sub(raw, 1, 1) == '{' then
    holds = cjson.decode(raw)
  elseif raw then
    holds[user] = tonumber(raw)  -- a hold written before holds named their user
  end
  local mine = tonumber(holds[user] or 0)
  local held = tonumber(redis.call('HGET', key, 'b:' .. user) or '0')
  if qty <= mine then
    out[#out + 1] = 1
    out[#out + 1] = ''
  elseif held + qty - mine > limit then
    out[#out + 1] = 5
    out[#out + 1] = tostring(held)
  else
    holds[user] = qty
    redis.call('HSET', key, 'h:' .. token, cjson.encode(holds))
    redis.call('HINCRBY', key, 'b:' .. user, qty - mine)
    out[#out + 1] = 1
    out[#out + 1] = ''
  end
end
redis.call('HINCRBY', key, 'calls', 1)
return out
