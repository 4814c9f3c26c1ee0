-- Load a partitioned SKU's own keys, once its partitions are loaded: the layout and the pool.
--
-- KEYS[1] fs:{sku}:stock      deleted: a partitioned SKU sells from its partitions only
-- KEYS[2] fs:{sku}:log        deleted, with KEYS[3] (and KEYS[5], see there): an earlier unpartitioned sale's history
-- KEYS[3] fs:{sku}:users
-- KEYS[4] fs:{sku}:meta       initial, parts, refill, threshold, loaded_ms (the epoch: each partition
--                             keeps it too, and refuses a pre-deduct placed by another one)
-- KEYS[5] fs:{sku}:tx         its records kept, those that ran retired (decided.lua)
-- KEYS[6] fs:{sku}:pool       units not given to a partition yet
-- KEYS[7] fs:{sku}:transfers  pending moves between the pool and the partitions (emptied)
-- KEYS[8] fs:{sku}:done       completed moves of the load before (emptied)
-- KEYS[9] fs:{sku}:checks     the transaction checks of the sale before (emptied)
-- KEYS[10] fs:{sku}:added     the restocks of an earlier unpartitioned sale (deleted)
-- KEYS[11] fs:{sku}:loading   the first-load lease (freeze.lua): a SKU with no meta yet loads only under it
-- ARGV[1] initial stock of the SKU
-- ARGV[2] pool
-- ARGV[3] the partitions, space separated
-- ARGV[4] refill size
-- ARGV[5] switch threshold
-- ARGV[6] per-user limit (0: none), kept by user_hold.lua across the partitions
-- ARGV[7] the epoch, given to the partitions when they were loaded
-- ARGV[8] (optional) the token of the load's freeze (freeze.lua): the load runs only while it holds it
-- ARGV[9] (optional) the load's number (ticket.lua), kept in the meta as `ticket` (see load_stock.lua)
--
-- Returns the epoch, or -1 when the load no longer holds the SKU's freeze (nothing written).

-- include: decided
-- include: held

if lost_freeze(KEYS[4], ARGV[8] or '', KEYS[11]) then
  return -1
end

local epoch = tonumber(ARGV[7])
local decided = decided_records(KEYS[5])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[7], KEYS[8], KEYS[9], KEYS[10])
put_back(KEYS[5], decided)
redis.call('SET', KEYS[6], tonumber(ARGV[2]))
redis.call('HSET', KEYS[4],
  'initial', tonumber(ARGV[1]), 'per_user_limit', tonumber(ARGV[6]), 'parts', ARGV[3],
  'refill', tonumber(ARGV[4]), 'threshold', tonumber(ARGV[5]), 'loaded_ms', epoch,
  'ticket', tonumber(ARGV[9] or '0') or 0)
return epoch
