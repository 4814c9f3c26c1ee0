-- Step 3 of a refill (see pool_take.lua), once the partition applied it: the transfer is complete. Its
-- record moves to the SKU's completed transfers, in one step, and stays known there for the life of
-- the load, so that a step 1 or 2 run again after this one counts nothing.
--
-- KEYS[1] fs:{sku}:transfers  hash id -> JSON record: transfers under way
-- KEYS[2] fs:{sku}:done       hash id -> units: completed transfers
-- KEYS[3] fs:{sku}:meta       loaded_ms (the load's epoch)
-- ARGV[1] transfer id
-- ARGV[2] the epoch of the caller's layout
--
-- Returns 1 when completed now, 0 when it had been (a counter is written), -2 for another load.
local transfers_key, done_key, meta_key = KEYS[1], KEYS[2], KEYS[3]
local id, epoch = ARGV[1], ARGV[2]
if redis.call('HGET', meta_key, 'loaded_ms') ~= epoch then
  return -2
end
local record = redis.call('HGET', transfers_key, id)
if not record then
  redis.call('HINCRBY', meta_key, 'reruns', 1)
  return 0
end
redis.call('HDEL', transfers_key, id)
redis.call('HSET', done_key, id, cjson.decode(record)['qty'])
return 1
