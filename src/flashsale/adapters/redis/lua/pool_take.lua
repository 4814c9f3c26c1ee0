-- Step 1 of a refill: take units from a SKU's pool for one partition, recorded as transfer `id`.
-- Step 2 (refill_apply.lua) adds them to the partition once; step 3 (refill_end.lua) moves the record to
-- the SKU's completed transfers, which are kept for the life of the load: a step run again at any time
-- (a reply lost, a WAIT short, a sweep that completed the transfer meanwhile) counts nothing twice.
--
-- KEYS[1] fs:{sku}:pool       units not given to any partition yet
-- KEYS[2] fs:{sku}:transfers  hash id -> JSON {dir: out|in, part, qty, ts}: transfers under way
-- KEYS[3] fs:{sku}:meta       loaded_ms (the load's epoch), parts; `moves`: transfers ever begun (a
--                             sold-out read checks none began meanwhile)
-- KEYS[4] fs:{sku}:done       hash id -> units: completed transfers
-- ARGV[1] transfer id
-- ARGV[2] partition (sku#n)
-- ARGV[3] units wanted
-- ARGV[4] the epoch of the caller's layout
--
-- Returns {taken, record}: the units taken (the transfer's own, when it exists already or is complete);
-- -1 when the SKU has no pool; -2 when the caller's layout is not this load's, or does not name the
-- partition (nothing written). Every answer of a taken transfer writes (a counter), so that a WAIT
-- after it proves a replica holds it.
-- include: clock
local pool_key, transfers_key, meta_key, done_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, part, want, epoch = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]

local meta = redis.call('HMGET', meta_key, 'loaded_ms', 'parts')
if meta[1] ~= epoch or not string.find(' ' .. (meta[2] or '') .. ' ', ' ' .. part .. ' ', 1, true) then
  return {-2, ''}
end
local done = redis.call('HGET', done_key, id)
local record = redis.call('HGET', transfers_key, id)
if done or record then
  redis.call('HINCRBY', meta_key, 'reruns', 1)
  return {done and tonumber(done) or cjson.decode(record)['qty'], record or ''}
end
local pool = tonumber(redis.call('GET', pool_key) or '-1')
if pool < 0 then
  return {-1, ''}
end
local qty = math.min(pool, want)
if qty <= 0 then
  return {0, ''}
end
local now_ms = clock_ms()
record = cjson.encode({
  dir = 'out', part = part, qty = qty, ts = now_ms,
})
redis.call('SET', pool_key, pool - qty)
redis.call('HSET', transfers_key, id, record)
redis.call('HINCRBY', meta_key, 'moves', 1)
return {qty, record}
