-- Step 2 of a refill (see pool_take.lua): add the transfer's units to the partition's standby
-- sub-domain, once per transfer id.
--
-- KEYS[1] fs:{sku#n}:meta     standby, counters
-- KEYS[2] fs:{sku#n}:refills  hash transfer id -> units (negative: drained out, see drain.lua)
-- ARGV[1] transfer id
-- ARGV[2] units
--
-- Returns 1 when applied now, 0 when it had been.
local meta_key, refills_key = KEYS[1], KEYS[2]
local id, qty = ARGV[1], tonumber(ARGV[2])
if redis.call('HEXISTS', refills_key, id) == 1 then
  return 0
end
redis.call('HSET', refills_key, id, qty)
redis.call('HINCRBY', meta_key, 'standby', qty)
redis.call('HINCRBY', meta_key, 'refilled_qty', qty)
redis.call('HSET', meta_key, 'sold_out', 0)
return 1
