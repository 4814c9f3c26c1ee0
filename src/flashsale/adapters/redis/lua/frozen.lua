-- Does a load hold the SKU (or partition) frozen now, by the clock of the node that holds it (the one
-- freeze.lua wrote frozen_until by)? The consumer asks before it applies a batch naming it: a `stock
-- set` writes MySQL before Redis, and while it is frozen MySQL may hold the new load already while Redis
-- still holds the old sale's records, whose messages must not be applied to the new load.
--
-- KEYS[1] fs:{sku}:meta  frozen_until (ms, Redis's clock)
-- ARGV none
--
-- Returns 1 frozen, 0 not (no freeze, or one that ran out).
-- include: clock
local until_ms = tonumber(redis.call('HGET', KEYS[1], 'frozen_until'))
if until_ms and clock_ms() < until_ms then
  return 1
end
return 0
