-- Step 2 of a refill (see pool_take.lua): add the transfer's units to the partition's standby
-- sub-domain, once per transfer id.
--
-- KEYS[1] fs:{sku#n}:stock    its active sub-domain (there while the partition is)
-- KEYS[2] fs:{sku#n}:meta     standby, epoch, counters
-- KEYS[3] fs:{sku#n}:refills  hash transfer id -> units (negative: drained out, see drain.lua), kept
--                             for the life of the load
-- ARGV[1] transfer id
-- ARGV[2] units
-- ARGV[3] the epoch of the caller's layout
--
-- Returns 1 when applied now, 0 when it had been (a counter is written all the same, so that a WAIT
-- after it proves a replica holds it) or moves no units (nothing written), -2 when the partition is gone or of another load (nothing
-- written: the units stay with the transfer of the old load, which a new load discards).
local stock_key, meta_key, refills_key = KEYS[1], KEYS[2], KEYS[3]
local id, qty, epoch = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local own = redis.call('HGET', meta_key, 'epoch')
if redis.call('EXISTS', stock_key) == 0 or (own and own ~= epoch) then
  return -2
end
if qty <= 0 then
  -- A transfer of no units adds nothing and leaves no record: a take that found the pool empty wrote
  -- none either, and one run again under the same id once units came back moves them.
  return 0
end
if redis.call('HEXISTS', refills_key, id) == 1 then
  redis.call('HINCRBY', meta_key, 'reruns', 1)
  return 0
end
redis.call('HSET', refills_key, id, qty)
redis.call('HINCRBY', meta_key, 'standby', qty)
redis.call('HINCRBY', meta_key, 'refilled_qty', qty)
redis.call('HSET', meta_key, 'sold_out', 0)
return 1
