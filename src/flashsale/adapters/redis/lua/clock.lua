-- Redis's clock in ms. Every time a script keeps or compares is the server's, never a client's: one
-- clock for every producer, checker and consumer, however far theirs drift.
local function clock_ms()
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
end
