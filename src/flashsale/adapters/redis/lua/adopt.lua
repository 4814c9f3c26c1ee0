-- Put back into Redis a deduction MySQL applied but the Redis log lacks (reconcile --repair).
--
-- KEYS[1] fs:{sku}:stock
-- KEYS[2] fs:{sku}:log
-- KEYS[3] fs:{sku}:users
-- KEYS[4] fs:{sku}:meta
-- ARGV[1] token
-- ARGV[2] user id
-- ARGV[3] quantity
-- ARGV[4] timestamp (ms) of the original deduction
-- ARGV[5] message id
-- ARGV[6] sku
-- ARGV[7] mode: 'entry'  = only the log entry was lost (stock and counters still count the deduction)
--               'deduct' = Redis lost the whole deduction (e.g. a failover): take the stock again too
-- ARGV[8] its order's state as MySQL has it (awaiting, paid, cancelled, expired), '' when final
-- ARGV[9] the order's deadline (ms), '' when none
-- ARGV[10] when the order was decided (ms), '' when it was not
-- ARGV[11] the number of the load MySQL held as the deduction was read (ticket.lua; '0': loaded without one)
--
-- An order cancelled or expired in MySQL gave its units back there: its entry is written back as
-- returned, and in 'deduct' mode the stock is not taken again (the deduction and its return both count).
--
-- Returns {code, detail}:
--   0 nothing to do: the token already has a log entry (detail = its state; a counter is written)
--   1 adopted
--   2 refused: 'deduct' needs more stock than Redis has (detail = remaining; a partition's counts its
--     standby sub-domain, which it takes from as a pre-deduct does); an operator must decide
--   3 sealed: nothing written (detail = ms until the seal ends); ask again then
--   4 reloaded: the meta holds another load than ARGV[11] (detail = its number), or none (detail ''): nothing
--     written. A meta loaded before loads were numbered (no `ticket`) takes any.
--
-- A deduction belongs to the load it was sold in. A reload since the repair read MySQL (it may have waited
-- seconds for a seal) replaced that sale: written into the new one, the old deduction would take one of
-- its units, and its log entry would be replayed into the new sale's books as an order nobody placed.
--
-- While a seal runs (seal.lua), producers answer `sold_out` from copies of the log that lack this token:
-- a buyer asking again with it would hear `sold_out`. So it is written only once the seal has ended; and
-- from the first refusal no seal begins or grows (meta `seal_barred_until`, BAR_MS past the seal's end),
-- so the caller's next try, when it ends, finds none. The bar outlives the write, so that the repair's
-- next tokens of the SKU need no wait either; sold-out answers meanwhile read Redis.
-- include: clock
local stock_key, log_key, users_key, meta_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local token, user, qty_arg, ts, message_id, sku, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local order, due, decided = ARGV[8] or '', tonumber(ARGV[9] or ''), tonumber(ARGV[10] or '')
local returned = order == 'cancelled' or order == 'expired'
local BAR_MS = 5000

local initial, load = unpack(redis.call('HMGET', meta_key, 'initial', 'ticket'))
if not initial then
  return {4, ''}
end
if load and tonumber(load) ~= tonumber(ARGV[11]) then
  return {4, load}
end
local seen = redis.call('HGET', log_key, token)
if seen then
  -- A write all the same (a counter), so that a WAIT after a run asked again proves a replica holds it.
  if redis.call('EXISTS', meta_key) == 1 then
    redis.call('HINCRBY', meta_key, 'reruns', 1)
  end
  return {0, cjson.decode(seen)['state']}
end
local sealed_until = tonumber(redis.call('HGET', meta_key, 'sealed_until') or '0')
local now = clock_ms()
if now < sealed_until then
  redis.call('HSET', meta_key, 'seal_barred_until', sealed_until + BAR_MS)
  return {3, tostring(sealed_until - now)}
end
local qty = tonumber(qty_arg)
local stock = tonumber(redis.call('GET', stock_key) or '-1')
local entry = {
  state = returned and 'returned' or 'deducted', sku = sku, user = user, qty = qty,
  ts = tonumber(ts), msg = message_id, restored = 1,
}
if order ~= '' then
  entry['order'], entry['due'], entry['decided_ts'] = order, due, decided
end
if mode == 'deduct' and returned then
  redis.call('HINCRBY', meta_key, 'deducted_qty', qty)
  redis.call('HINCRBY', meta_key, 'deducted_count', 1)
  redis.call('HINCRBY', meta_key, 'returned_qty', qty)
  redis.call('HINCRBY', meta_key, 'returned_count', 1)
elseif mode == 'deduct' then
  -- A partition's standby sub-domain is on sale too: switched in as prededuct.lua does (not on a closed
  -- partition, which sells nothing more and whose units a drain takes back to the pool).
  local standby = tonumber(redis.call('HGET', meta_key, 'standby') or '0') or 0
  if stock < qty and standby > 0 and redis.call('HGET', meta_key, 'closed') ~= '1' then
    stock, standby = stock + standby, 0
    redis.call('HSET', meta_key, 'standby', 0)
    redis.call('HINCRBY', meta_key, 'switches', 1)
  end
  if stock < qty then
    return {2, tostring(stock + standby)}
  end
  -- On sale before and after it, both sub-domains counted, as a pre-deduct's entry says.
  entry['from'] = stock + standby
  entry['to'] = stock + standby - qty
  redis.call('SET', stock_key, stock - qty)
  redis.call('HINCRBY', meta_key, 'deducted_qty', qty)
  redis.call('HINCRBY', meta_key, 'deducted_count', 1)
  if tonumber(redis.call('HGET', meta_key, 'per_user_limit') or '0') > 0 then
    redis.call('HINCRBY', users_key, user, qty)
  end
  if stock - qty == 0 and standby == 0 then
    redis.call('HSET', meta_key, 'sold_out', 1)
  end
end
redis.call('HSET', log_key, token, cjson.encode(entry))
-- A token written into the log outside a pre-deduct: producers' copies of a sealed SKU's log (seal.lua)
-- lack it, so the run of seals ends here and the next renewal sends the log again.
redis.call('HDEL', meta_key, 'sealed_since')
return {1, ''}
