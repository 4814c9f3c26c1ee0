-- Step 3 of a drain (see drain.lua): add the drained units to the pool and move the transfer's record
-- to the completed ones, in one step, so that they are added once, whenever this runs again.
--
-- KEYS[1] fs:{sku}:pool
-- KEYS[2] fs:{sku}:transfers  hash id -> JSON {dir: in, part, want, ts}
-- KEYS[3] fs:{sku}:done       hash id -> units: completed transfers
-- KEYS[4] fs:{sku}:meta       loaded_ms (the load's epoch), counters
-- ARGV[1] transfer id
-- ARGV[2] units drained
-- ARGV[3] the epoch of the caller's layout
--
-- Returns 1 when added now, 0 when it was before (a counter is written), -2 for another load.
local pool_key, transfers_key, done_key, meta_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, qty, epoch = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if redis.call('HGET', meta_key, 'loaded_ms') ~= epoch then
  return -2
end
if redis.call('HDEL', transfers_key, id) == 0 then
  redis.call('HINCRBY', meta_key, 'reruns', 1)
  return 0
end
redis.call('INCRBY', pool_key, qty)
redis.call('HSET', done_key, id, qty)
return 1
