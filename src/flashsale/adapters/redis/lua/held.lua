-- Does the load of token `token` still hold the freeze of the SKU (or partition) whose meta is
-- `meta_key`? A load that outlived its freeze (a stall longer than it, a renewal that could not reach
-- Redis) must write nothing: purchases may have landed since it read the history, and its writes would
-- discard them. Where the meta does not exist (the SKU is new, or gone) and the script names the
-- first-load lease `loading_key` (freeze.lua), the load must still hold that lease: another first load
-- may have begun once it ran out, and written MySQL. A load run with no token ('') froze nothing.
-- include: clock
local function lost_freeze(meta_key, token, loading_key)
  if token == '' then
    return false
  end
  if redis.call('EXISTS', meta_key) == 0 then
    return loading_key ~= nil and redis.call('GET', loading_key) ~= token
  end
  local by, until_ms = unpack(redis.call('HMGET', meta_key, 'frozen_by', 'frozen_until'))
  local now_ms = clock_ms()
  return by ~= token or not until_ms or now_ms >= tonumber(until_ms)
end
