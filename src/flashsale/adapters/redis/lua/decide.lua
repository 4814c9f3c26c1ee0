-- Decide an order awaiting payment, once: pay, cancel or expire, against its token's log entry.
--
-- The keys are those of the SKU, or for a partitioned SKU those of the partition `sku#n` whose log holds
-- the token (the first of its order that does: records.Layout.order); its units go back there.
--
-- KEYS[1] fs:{sku}:stock  (a partition's active sub-domain)
-- KEYS[2] fs:{sku}:log
-- KEYS[3] fs:{sku}:users
-- KEYS[4] fs:{sku}:meta
-- KEYS[5] fs:{sku}:tx
-- ARGV[1] action: pay, cancel or expire
-- ARGV[2] token of the order
-- ARGV[3] user: for cancel, the buyer asking (it must be the order's); '' for pay and expire
-- ARGV[4] decision id: the request's own id (a payment's id, a cancel's request id); the same id asked
--         again gets the answer it got the first time
-- ARGV[5] message id of the half message that carries the decision (recorded for the checker)
--
-- Returns {code, entry}, entry being the order's log entry after the call ('' when there is none):
--   1 paid               this call paid it
--   2 cancelled          this call cancelled it: its units are back on sale
--   3 expired            this call expired it: its units are back on sale
--   4 already paid       decided before, by another request (or by this one for another action)
--   5 already cancelled
--   6 already expired    also a payment that arrives once the deadline has passed: the order is expired
--                        then and there, its units given back, so no payment ever lands on a unit that
--                        goes back on sale
--   7 not due            expire before the deadline: nothing changes
--   8 no order           the token has no deducted entry (never accepted, or rolled back)
--   9 final              the SKU takes no payments: its orders were final on acceptance
--  10 not yours          cancel by another user than the buyer: nothing changes
--  11 frozen             the SKU is being loaded again: ask again
--  12 invalid action
--  13 fenced             the checker rolled this message back before it ran: nothing is decided
--
-- Whichever decision runs first wins: every decision of a token runs on its slot, one at a time. The
-- deadline is judged on Redis's clock alone. A message whose decision changed the order is recorded
-- (fs:{sku}:tx): run again, it gets that outcome and still writes (a counter), so that a WAIT after it
-- proves a replica holds the decision; an answer read from a decided entry (already paid, ...) writes a
-- counter for the same reason. Any other answer that changes nothing writes nothing.
-- include: give_back

-- include: clock
local stock_key, log_key, users_key, meta_key, tx_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local action, token, user, decision, gid = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local DECIDED = {paid = 1, cancelled = 2, expired = 3}
local ALREADY = {paid = 4, cancelled = 5, expired = 6}
local ENDS = {pay = 'paid', cancel = 'cancelled', expire = 'expired'}

if not ENDS[action] then
  return {12, ''}
end
local ts = clock_ms()

local record = redis.call('HGET', tx_key, gid)
if record then
  if redis.call('EXISTS', stock_key) == 1 then
    redis.call('HINCRBY', meta_key, 'reruns', 1)
  end
  local code = tonumber(cjson.decode(record)['code']) or 13
  return {code, redis.call('HGET', log_key, token) or ''}
end
if redis.call('EXISTS', stock_key) == 0 then
  return {8, ''}  -- the SKU is not loaded (any more): nothing to decide, nothing written
end
local frozen_until = redis.call('HGET', meta_key, 'frozen_until')
if frozen_until and ts < tonumber(frozen_until) then
  return {11, ''}
end

-- An answer that changes nothing writes nothing: its message is rolled back (by the producer, or by the
-- checker once it fences the message, finding no record).
local seen = redis.call('HGET', log_key, token)
if not seen then
  return {8, ''}
end
local entry = cjson.decode(seen)
local order, due = entry['order'], tonumber(entry['due'])
if type(order) ~= 'string' or not due then
  return {entry['state'] == 'fenced' and 8 or 9, seen}  -- fenced: never deducted; else final on acceptance
end
if action == 'cancel' and user ~= entry['user'] then
  return {10, ''}
end
if order ~= 'awaiting' then
  -- An answer from the entry writes (a counter): a WAIT after it proves a replica holds that entry.
  redis.call('HINCRBY', meta_key, 'reruns', 1)
  local same = entry['decision'] == decision and ENDS[action] == order
  return {same and DECIDED[order] or ALREADY[order], seen}
end
if entry['state'] ~= 'deducted' then
  return {8, seen}  -- an awaiting order whose units went back some other way: nothing left to decide
end
if action == 'expire' and ts < due then
  return {7, seen}
end
local ending = ENDS[action]
if action == 'pay' and ts >= due then
  ending = 'expired'  -- the deadline passed first: it decides, whoever asks
end

entry['order'], entry['decided_ts'], entry['decided_msg'] = ending, ts, gid
entry['decision'] = ending == ENDS[action] and decision or nil
if ending ~= 'paid' then
  give_back(stock_key, users_key, meta_key, entry)
end
local updated = cjson.encode(entry)
local code = ending == ENDS[action] and DECIDED[ending] or ALREADY[ending]
redis.call('HSET', log_key, token, updated)
redis.call('HINCRBY', meta_key, ending .. '_count', 1)
-- The record tells the checker this message ran, and a rerun of it gets this answer.
redis.call('HSET', tx_key, gid, cjson.encode({state = 'ran', kind = 'decision', token = token, code = code, ts = ts}))
return {code, updated}
