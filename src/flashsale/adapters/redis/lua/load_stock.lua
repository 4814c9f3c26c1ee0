-- Load a SKU's stock for a sale.
--
-- KEYS[1] fs:{sku}:stock
-- KEYS[2] fs:{sku}:log
-- KEYS[3] fs:{sku}:users
-- KEYS[4] fs:{sku}:meta
-- KEYS[5] fs:{sku}:tx
-- KEYS[6] fs:{sku}:checks
-- KEYS[7] fs:{sku}:added   the restocks of the load before
-- KEYS[8] fs:{sku}:loading the first-load lease (freeze.lua): a SKU with no meta yet loads only under it
-- ARGV[1] quantity        decimal digits, >= 0
-- ARGV[2] per-user limit  decimal digits, 0 = none
-- ARGV[3] '1' to discard the sale's history (log, per-user counts, counters; the records of messages
--         are kept, those that ran retired: decided.lua), '0' otherwise
-- ARGV[4] (a partition only, else '') the switch threshold of its sub-domains; its standby starts empty
-- ARGV[5] (a partition only, else '') the epoch of its SKU's layout: a pre-deduct placed by another layout
--         is refused
-- ARGV[6] (optional) milliseconds a buyer has to pay an accepted purchase ('' or '0': orders are final on
--         acceptance); prededuct.lua writes each entry's deadline from it
-- ARGV[7] (optional) the token of the load's freeze (freeze.lua): the load runs only while it holds it
-- ARGV[8] (optional) the load's number (ticket.lua), kept in the meta as `ticket`: the consumer applies
--         what it read here to MySQL only while MySQL holds no later load (MySQL is loaded first)
-- ARGV[9] (optional) when the seal of the SKU ends (seal.lua; ms, Redis's clock), as the load read it under
--         its freeze: a producer may answer `sold_out` from memory until then, so the new stock waits for
--         it (a partition's too). The SKU's own running seal is kept whatever this says.
--
-- Returns {code, detail}:
--   1 loaded
--   2 refused: the SKU has deductions on record (detail = how many log entries) and ARGV[3] is '0'
--   3 invalid argument (detail names it)
--   4 refused: the load no longer holds the SKU's freeze (detail 'freeze'); nothing written

-- include: decided
-- include: held

-- include: clock
local stock_key, log_key, users_key, meta_key, tx_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local qty_arg, limit_arg, reset = ARGV[1], ARGV[2], ARGV[3]
local threshold_arg, epoch_arg, pay_arg = ARGV[4] or '', ARGV[5] or '', ARGV[6] or ''

if not string.match(qty_arg, '^%d+$') or #qty_arg > 15 then
  return {3, 'quantity'}
end
if not string.match(limit_arg, '^%d+$') or #limit_arg > 9 then
  return {3, 'per-user limit'}
end
if threshold_arg ~= '' and (not string.match(threshold_arg, '^%d+$') or #threshold_arg > 15) then
  return {3, 'threshold'}
end
if threshold_arg ~= '' and not string.match(epoch_arg, '^%d+$') then
  return {3, 'epoch'}
end
if pay_arg ~= '' and (not string.match(pay_arg, '^%d+$') or #pay_arg > 12) then
  return {3, 'pay within'}
end
if lost_freeze(meta_key, ARGV[7] or '', KEYS[8]) then
  return {4, 'freeze'}
end
local entries = redis.call('HLEN', log_key)
if entries > 0 and reset ~= '1' then
  return {2, tostring(entries)}
end

local decided = decided_records(tx_key)

local now_ms = clock_ms()
local qty = tonumber(qty_arg)
local sealed_until, sealed_since = unpack(redis.call('HMGET', meta_key, 'sealed_until', 'sealed_since'))
sealed_until = math.max(tonumber(sealed_until or '0'), tonumber(ARGV[9] or '') or 0)
redis.call('DEL', log_key, users_key, meta_key, tx_key, KEYS[6], KEYS[7])
put_back(tx_key, decided)
redis.call('SET', stock_key, qty)
redis.call('HSET', meta_key,
  'initial', qty,
  'per_user_limit', tonumber(limit_arg),
  'sold_out', qty == 0 and 1 or 0,
  'deducted_qty', 0, 'deducted_count', 0,
  'returned_qty', 0, 'returned_count', 0,
  'fenced_count', 0,
  'pay_within_ms', tonumber(pay_arg ~= '' and pay_arg or '0'),
  'loaded_ms', now_ms,
  'ticket', tonumber(ARGV[8] or '0') or 0)
if sealed_until > now_ms then
  redis.call('HSET', meta_key, 'sealed_until', sealed_until, 'sealed_since', sealed_since or tostring(now_ms))
end
if threshold_arg ~= '' then
  redis.call('HSET', meta_key, 'threshold', tonumber(threshold_arg), 'standby', 0, 'refilled_qty', 0,
    'drained_qty', 0, 'epoch', epoch_arg)
end
return {1, ''}
