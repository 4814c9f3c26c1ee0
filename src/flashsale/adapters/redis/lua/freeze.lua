-- Freeze a SKU (or one partition) while it is loaded again, renew that freeze, or thaw it: while frozen,
-- prededuct.lua refuses every purchase as placed by another load (nothing deducted; the buyer hears
-- `error` and asks again), so that the history a reload looks at cannot grow under it. The freeze ends
-- by itself at frozen_until (a `stock set` that died midway never stops a sale for good), or when the
-- load replaces the meta. It names the load that holds it (frozen_by): the load's own scripts run only
-- while that load still holds it (held.lua), so a load that outlived its freeze writes nothing.
--
-- A SKU never loaded has no meta to freeze, and its first load still needs one: two first loads at once
-- would each write MySQL, and the one whose Redis load came second would be refused, leaving MySQL with
-- one's quantity and Redis with the other's. So a first load holds a lease of its own on KEYS[3], the
-- same lease under another key, which ends by itself, is renewed, and is thawed alike.
--
-- KEYS[1] fs:{sku}:stock (a partitioned SKU's own keys: fs:{sku}:pool, so that restocks into it wait)
-- KEYS[2] fs:{sku}:meta   frozen_until (ms, Redis's clock), frozen_by
-- KEYS[3] fs:{sku}:loading  the token of the first load under way, expiring with its lease
-- ARGV[1] how long to freeze from now, ms; 0 thaws (only a freeze of ARGV[2]'s)
-- ARGV[2] the load's token
-- ARGV[3] 'renew': extend only a freeze this token holds and that has not run out
--
-- Returns 1 frozen (renewed, thawed), 0 nothing to thaw (neither KEYS[1] nor KEYS[2] exists), 2 another
-- load holds the freeze, 3 (renew) this token's freeze has run out or was replaced: purchases may have
-- landed since, or another first load may have begun. A meta that exists is frozen even with KEYS[1]
-- gone (a load cut short after it dropped the pool): the load's scripts ask any meta that exists for
-- the freeze (held.lua).
-- include: clock
local ms, token = tonumber(ARGV[1]), ARGV[2]
local first = redis.call('GET', KEYS[3])
if ms == 0 and first == token then
  redis.call('DEL', KEYS[3])
end
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  if ms == 0 then
    return 0
  end
  if ARGV[3] == 'renew' then
    if first ~= token then
      return 3
    end
  elseif first and first ~= token then
    return 2
  end
  redis.call('SET', KEYS[3], token, 'PX', ms)
  return 1
end
local by, until_ms = unpack(redis.call('HMGET', KEYS[2], 'frozen_by', 'frozen_until'))
if ms == 0 then
  if by == token or not by then
    redis.call('HDEL', KEYS[2], 'frozen_until', 'frozen_by')
  end
  return 1
end
local now_ms = clock_ms()
local running = until_ms and now_ms < tonumber(until_ms)
if ARGV[3] == 'renew' and not (by == token and running) then
  return 3
end
if by and by ~= token and running then
  return 2
end
redis.call('HSET', KEYS[2], 'frozen_until', now_ms + ms, 'frozen_by', token)
return 1
