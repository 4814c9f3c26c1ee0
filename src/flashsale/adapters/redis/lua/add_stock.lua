-- Add units to a SKU's stock while it is on sale, once per request id: a restock's local transaction.
-- A SKU sold from one key gets them in its stock; a partitioned SKU in its pool, from which the
-- producers' schedulers refill the partitions (the anchor never closes, so they always sell).
--
-- KEYS[1] fs:{sku}:stock
-- KEYS[2] fs:{sku}:meta
-- KEYS[3] fs:{sku}:tx     hash message id -> JSON record (the checker and the consumer read this one)
-- KEYS[4] fs:{sku}:added  hash request id -> JSON {qty, msg, ts}: every restock of this load
-- KEYS[5] fs:{sku}:pool   a partitioned SKU's units not given to a partition yet
-- ARGV[1] units to add (decimal digits, >= 1)
-- ARGV[2] request id: the same id asked again adds nothing and hears what the first one added
-- ARGV[3] message id of the half message that carries the restock to MySQL
--
-- Returns {code, stock, record}, stock being the SKU's stock (a partitioned SKU's pool) after the call
-- (-1: not loaded) and record the request's {qty, msg, ts} ('' when it added nothing):
--   1 added           this call added the units
--   2 already added   an earlier message of this request id added them (record = what it added)
--   3 unknown sku     not loaded here
--   4 frozen          the SKU is being loaded again: ask again
--   5 other qty       an earlier message of this request id added another quantity (record = what it
--                     added): nothing more is added
--   6 invalid qty
--   7 fenced          the checker rolled this message back before it ran: nothing is added
--
-- A message that ran here is recorded (KEYS[3]): run again, it gets that answer and still writes (a
-- counter), so that a WAIT after it proves a replica holds what it answers from; so does an answer from
-- the request's record (already added, other qty). A refusal writes nothing: its message is rolled back.

-- include: clock
local meta_key, tx_key, added_key = KEYS[2], KEYS[3], KEYS[4]
local qty_arg, request, gid = ARGV[1], ARGV[2], ARGV[3]
-- The key the units go to: the SKU's stock, or a partitioned SKU's pool.
local stock_key = KEYS[1]
if redis.call('EXISTS', stock_key) == 0 and redis.call('EXISTS', KEYS[5]) == 1 then
  stock_key = KEYS[5]
end

local record = redis.call('HGET', tx_key, gid)
if record then
  if redis.call('EXISTS', stock_key) == 1 then
    redis.call('HINCRBY', meta_key, 'reruns', 1)
  end
  local code = tonumber(cjson.decode(record)['code']) or 7
  return {code, tonumber(redis.call('GET', stock_key) or '-1'), redis.call('HGET', added_key, request) or ''}
end
if not string.match(qty_arg, '^%d+$') or #qty_arg > 15 or tonumber(qty_arg) < 1 then
  return {6, -1, ''}
end
if redis.call('EXISTS', stock_key) == 0 then
  -- A reload between dropping the old keys and writing its own (partitions to one key, or back) holds the
  -- SKU's freeze: the SKU is loaded, and the restock is asked again after the load, as any under it.
  local frozen_until = redis.call('HGET', meta_key, 'frozen_until')
  if frozen_until and clock_ms() < tonumber(frozen_until) then
    return {4, -1, ''}
  end
  return {3, -1, ''}
end
local qty = tonumber(qty_arg)
local stock = tonumber(redis.call('GET', stock_key))
-- What the request did stands whatever happens now (a reload under way included).
local first = redis.call('HGET', added_key, request)
if first then
  redis.call('HINCRBY', meta_key, 'reruns', 1)
  return {tonumber(cjson.decode(first)['qty']) == qty and 2 or 5, stock, first}
end
local ts = clock_ms()
local frozen_until = redis.call('HGET', meta_key, 'frozen_until')
if frozen_until and ts < tonumber(frozen_until) then
  return {4, stock, ''}
end

local left = redis.call('INCRBY', stock_key, qty)
redis.call('HINCRBY', meta_key, 'added_qty', qty)
redis.call('HINCRBY', meta_key, 'added_count', 1)
if stock_key == KEYS[1] then
  redis.call('HSET', meta_key, 'sold_out', 0)  -- (a partitioned SKU's registry reads its pool instead)
end
local added = cjson.encode({qty = qty, msg = gid, ts = ts})
redis.call('HSET', added_key, request, added)
redis.call('HSET', tx_key, gid, cjson.encode({state = 'ran', kind = 'restock', request = request, qty = qty, code = 1, ts = ts}))
return {1, left, added}
