-- Step 1 of a refill: take units from a SKU's pool for one partition, recorded as transfer `id`.
-- Step 2 (refill_apply.lua) adds them to the partition once; then the record is deleted. A refiller
-- that dies in between leaves the record, and whoever finds it runs step 2 again: a no-op if it ran.
--
-- KEYS[1] fs:{sku}:pool       units not given to any partition yet
-- KEYS[2] fs:{sku}:transfers  hash id -> JSON {dir: out|in, part, qty, ts}
-- KEYS[3] fs:{sku}:meta       `moves`: transfers ever begun (a sold-out read checks none began meanwhile)
-- ARGV[1] transfer id
-- ARGV[2] partition (sku#n)
-- ARGV[3] units wanted
--
-- Returns {taken, record}: the units taken (the record's, if the transfer exists already); -1 when
-- the SKU has no pool.
local pool_key, transfers_key = KEYS[1], KEYS[2]
local id, part, want = ARGV[1], ARGV[2], tonumber(ARGV[3])

local record = redis.call('HGET', transfers_key, id)
if record then
  return {cjson.decode(record)['qty'], record}
end
local pool = tonumber(redis.call('GET', pool_key) or '-1')
if pool < 0 then
  return {-1, ''}
end
local qty = math.min(pool, want)
if qty <= 0 then
  return {0, ''}
end
local now = redis.call('TIME')
record = cjson.encode({dir = 'out', part = part, qty = qty, ts = tonumber(now[1]) * 1000})
redis.call('SET', pool_key, pool - qty)
redis.call('HSET', transfers_key, id, record)
redis.call('HINCRBY', KEYS[3], 'moves', 1)
return {qty, record}
