-- Delete what an earlier load left (partitions out of the new layout, a pool no longer used), but only
-- while the load doing it still holds the SKU's freeze (held.lua): purchases may have landed since a
-- load that outlived it read the history.
--
-- A dropped partition's message records are not deleted but retired as a load retires its own
-- (decided.lua), for a day: a message of that partition's load, applied and delivered again, or still
-- open, or pre-deducted late, must find that its load was replaced.
--
-- KEYS[1] the meta whose freeze the load holds (fs:{sku}:meta of the partition, or of the SKU)
-- KEYS[2] the records to retire (fs:{sku}:tx of the partition), or KEYS[1] again when there are none
-- KEYS[3..] the keys to delete, on KEYS[1]'s slot
-- ARGV[1] the token of the load's freeze ('': the load froze nothing)
--
-- Returns 1 deleted, 0 refused (nothing written).

-- include: decided
-- include: held

if lost_freeze(KEYS[1], ARGV[1]) then
  return 0
end
local retire = KEYS[2] ~= KEYS[1]
local decided = retire and decided_records(KEYS[2]) or {}
redis.call('DEL', unpack(KEYS, 3))
if retire then
  redis.call('DEL', KEYS[2])
  if #decided > 0 then
    put_back(KEYS[2], decided)
    redis.call('PEXPIRE', KEYS[2], 86400000)
  end
end
return 1
