-- Freeze a SKU (or one partition) while it is loaded again, or thaw it: while frozen, prededuct.lua
-- refuses every purchase as placed by another load (nothing deducted; the buyer hears `error` and asks
-- again), so that the history a reload looks at cannot grow under it. The freeze ends by itself after
-- ARGV[1] ms (a `stock set` that died midway never stops a sale for good), or when the load replaces
-- the meta.
--
-- KEYS[1] fs:{sku}:stock (a partitioned SKU's own keys: fs:{sku}:pool, so that restocks into it wait)
-- KEYS[2] fs:{sku}:meta   frozen_until (ms, Redis's clock)
-- ARGV[1] how long to freeze, ms; 0 thaws
--
-- Returns 1 when the SKU (or partition) exists, 0 when there is nothing to freeze.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local ms = tonumber(ARGV[1])
if ms == 0 then
  redis.call('HDEL', KEYS[2], 'frozen_until')
  return 1
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[2], 'frozen_until', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + ms)
return 1
