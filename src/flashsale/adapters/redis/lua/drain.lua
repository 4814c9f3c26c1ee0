-- Step 2 of a drain (see pool_expect.lua): move units a partition cannot sell alone back toward the
-- pool, once per transfer id: standby first, then active. pool_receive.lua adds them to the pool.
--
-- KEYS[1] fs:{sku#n}:stock    active sub-domain
-- KEYS[2] fs:{sku#n}:meta     standby, epoch, counters
-- KEYS[3] fs:{sku#n}:refills  hash transfer id -> units (negative: drained out), kept for the load's life
-- ARGV[1] transfer id
-- ARGV[2] units wanted
-- ARGV[3] the epoch of the caller's layout
--
-- Returns the units drained (those of the first run, when run again: a counter is written then), or
-- -2 when the partition is gone or of another load (nothing written).
local stock_key, meta_key, refills_key = KEYS[1], KEYS[2], KEYS[3]
local id, want, epoch = ARGV[1], tonumber(ARGV[2]), ARGV[3]

local stock_raw = redis.call('GET', stock_key)
local own = redis.call('HGET', meta_key, 'epoch')
if not stock_raw or (own and own ~= epoch) then
  return -2
end
local done = redis.call('HGET', refills_key, id)
if done then
  redis.call('HINCRBY', meta_key, 'reruns', 1)
  return -tonumber(done)
end
local stock = tonumber(stock_raw)
local standby = tonumber(redis.call('HGET', meta_key, 'standby') or '0')
local from_standby = math.min(standby, want)
local from_stock = math.min(stock, want - from_standby)
local qty = from_standby + from_stock
redis.call('HSET', refills_key, id, -qty)
if qty > 0 then
  redis.call('HSET', meta_key, 'standby', standby - from_standby)
  redis.call('SET', stock_key, stock - from_stock)
  redis.call('HINCRBY', meta_key, 'drained_qty', qty)
  if stock - from_stock == 0 and standby - from_standby == 0 then
    redis.call('HSET', meta_key, 'sold_out', 1)
  end
end
return qty
