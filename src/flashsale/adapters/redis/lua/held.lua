-- Does the load of token `token` still hold the freeze of the SKU (or partition) whose meta is
-- `meta_key`? A load that outlived its freeze (a stall longer than it, a renewal that could not reach
-- Redis) must write nothing: purchases may have landed since it read the history, and its writes would
-- discard them. A meta that does not exist holds nothing to protect (the SKU is new, or gone); a load
-- run with no token ('') is one that froze nothing.
local function lost_freeze(meta_key, token)
  if token == '' or redis.call('EXISTS', meta_key) == 0 then
    return false
  end
  local by, until_ms = unpack(redis.call('HMGET', meta_key, 'frozen_by', 'frozen_until'))
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  return by ~= token or not until_ms or now_ms >= tonumber(until_ms)
end
