-- Delete what an earlier load left (partitions out of the new layout, a pool no longer used), but only
-- while the load doing it still holds the SKU's freeze (held.lua): purchases may have landed since a
-- load that outlived it read the history.
--
-- KEYS[1] the meta whose freeze the load holds (fs:{sku}:meta of the partition, or of the SKU)
-- KEYS[2..] the keys to delete, on KEYS[1]'s slot
-- ARGV[1] the token of the load's freeze ('': the load froze nothing)
--
-- Returns 1 deleted, 0 refused (nothing written).

-- include: held

if lost_freeze(KEYS[1], ARGV[1]) then
  return 0
end
redis.call('DEL', unpack(KEYS, 2))
return 1
