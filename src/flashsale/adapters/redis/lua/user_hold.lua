-- The per-user limit of a partitioned SKU: a hold per token and user on the buyer's count, taken before
-- the purchase goes to its partition (whose own script sees one slot, and so cannot count the others).
--
-- KEYS[1] fs:{#users:n}:sku:epoch  hash b:user -> units held by the user; h:token -> JSON {user: units};
--                                  a:token -> JSON {user: {attempt id: 1}}: the attempts that took or
--                                  rode the hold and were not told `sold_out` or `error` (user_release.lua)
--                                  (users sharded by their crc32; a new load of the SKU starts new keys)
-- ARGV[1] the per-user limit
-- ARGV[2..] token, user id, quantity, attempt id: four per purchase (the id names this attempt of the
--           token, so that this script or user_release.lua run again counts it once)
--
-- Returns a flat array, {code, detail} per purchase: 1 held, 5 limit exceeded (detail: the units the
-- user holds).
--
-- A token is deducted once at most, at one of the quantities it was sent with. So a user's hold on a
-- token is the largest quantity the user sent it with: a retry at that quantity or less counts nothing
-- more, a retry asking for more holds the difference (within the limit), and the same token sent by
-- another user holds on that user's count. A user is never sold more than the limit. Each attempt held
-- is recorded (a:token); once every attempt of the user's token was told `sold_out` or `error` (nothing
-- deducted), user_release.lua gives the hold back, since none deducted it and any later one takes a hold
-- again. A hold found with no record (taken by a script that kept none) and one whose token was asked
-- more than 8 times are marked kept (`*`) instead: never freed, as before records, and the record stays
-- small. Otherwise a hold is kept whatever the purchase's outcome, and whatever becomes of its order
-- (cancelled or expired, its units back on sale): the count can run ahead of the orders (a buyer who
-- gives up on an unclear answer, or lets an order go), never behind them. So a buyer whose order is
-- cancelled or expires does not get that share of the limit back; on a SKU on one key decide.lua frees
-- it, the count being on the order's slot.
--
-- Every call writes (a counter at least), so that a WAIT after it proves a replica holds the holds.
local key, limit = KEYS[1], tonumber(ARGV[1])
-- The record of a hold that is never freed, and the attempts a user's token keeps on record before it is.
local KEPT, MAX_ATTEMPTS = '*', 8
local out = {}
for i = 2, #ARGV - 3, 4 do
  local token, user, qty, attempt = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  local raw = redis.call('HGET', key, 'h:' .. token)
  local holds = {}
  if raw and string.sub(raw, 1, 1) == '{' then
    holds = cjson.decode(raw)
  elseif raw then
    holds[user] = tonumber(raw)  -- a hold written before holds named their user
  end
  local mine = tonumber(holds[user] or 0)
  local held = tonumber(redis.call('HGET', key, 'b:' .. user) or '0')
  if held + math.max(qty - mine, 0) > limit then
    out[#out + 1] = 5
    out[#out + 1] = tostring(held)
  else
    if qty > mine then
      holds[user] = qty
      redis.call('HSET', key, 'h:' .. token, cjson.encode(holds))
      redis.call('HINCRBY', key, 'b:' .. user, qty - mine)
    end
    local attempts = cjson.decode(redis.call('HGET', key, 'a:' .. token) or '{}')
    local mine_on_record = attempts[user]
    if mine > 0 and not mine_on_record then
      -- A hold no attempt is on record for was taken by a script that kept no record: attempts it
      -- does not know of may ride it, so it is never freed.
      mine_on_record = {[KEPT] = 1}
    end
    mine_on_record = mine_on_record or {}
    if not mine_on_record[KEPT] then
      mine_on_record[attempt] = 1
      local n = 0
      for _ in pairs(mine_on_record) do n = n + 1 end
      if n > MAX_ATTEMPTS then
        mine_on_record = {[KEPT] = 1}  -- a token asked again and again: its record stays small, its hold kept
      end
    end
    attempts[user] = mine_on_record
    redis.call('HSET', key, 'a:' .. token, cjson.encode(attempts))
    out[#out + 1] = 1
    out[#out + 1] = ''
  end
end
redis.call('HINCRBY', key, 'calls', 1)
return out
