-- Number a load of a SKU before it writes MySQL, while it still holds the SKU's freeze. MySQL keeps the
-- number of the load it holds and refuses a write with a lower one: a `stock set` that stalled past its
-- freeze after its last look at Redis, and wakes after another load wrote MySQL, must not overwrite that
-- quantity (or discard, with --reset, the orders of the sale since). Numbers follow the order loads held
-- the freeze in, since each is taken under it, atomically with the look at it.
--
-- KEYS[1] fs:{sku}:meta     the SKU's freeze (frozen_by, frozen_until)
-- KEYS[2] fs:{sku}:loading  the first-load lease, where no meta exists
-- KEYS[3] fs:{sku}:ticket   the last number given (never reset)
-- ARGV[1] the load's token
-- ARGV[2] the number MySQL holds
--
-- A Redis that lost the counter (flushed, restored from an old backup, failed over to a replica that had
-- not received it) still numbers above MySQL's; and, numbers being at least Redis's clock in ms, above
-- those given before the loss that MySQL never saw (a load that stalled holding one), unless its clock is
-- behind the old one's by more than the time since.
--
-- Returns the load's number (>= 1), or 0 when the load no longer holds the freeze: it must write nothing.
-- include: held
if ARGV[1] == '' or lost_freeze(KEYS[1], ARGV[1], KEYS[2]) then
  return 0
end
local last = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), tonumber(ARGV[2]), clock_ms())
redis.call('SET', KEYS[3], last + 1)
return last + 1
