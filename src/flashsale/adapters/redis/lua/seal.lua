-- Seal a sold-out SKU, so that a producer may answer `sold_out` from its memory for a while, with no read.
--
-- A producer answers `sold_out` from memory only to a token that is not in the SKU's log, and only while
-- it trusts its last seal. For that to be right, no token may be deducted that its copy of the log does
-- not hold: so while the seal runs (meta `sealed_until`, Redis's clock), prededuct.lua sells nothing,
-- even when units came back (an order cancelled or expired, a restock): they go on sale when it ends.
-- A seal is only taken or renewed while the stock is 0, so units back end it within one lease.
--
-- `sealed_since` names the run of seals a producer's copy of the log belongs to: the copy holds every
-- token while the run lasts. A run ends when a token is written into the log (prededuct.lua, once a seal
-- ended and units came back; adopt.lua) or a seal ends; the next seal starts another and sends the log.
--
-- KEYS[1] fs:{sku}:stock
-- KEYS[2] fs:{sku}:log   hash token -> JSON log entry
-- KEYS[3] fs:{sku}:meta  per-SKU fields; sealed_until, sealed_since written here
-- ARGV[1] how long the caller will trust this seal, ms (its clock starts before this call)
-- ARGV[2] the `sealed_since` of the caller's copy of the log ('' when it has none)
-- ARGV[3] the most tokens the caller takes: a larger log is not sealed
--
-- Returns {0} when the SKU cannot be sealed: not loaded, partitioned, being loaded again (frozen), a
-- repair waiting to write a token into the log (adopt.lua), units on sale, or its log too large. Else
-- {1, since} when the caller's copy is current, or {1, since, tokens} with every token of the log.
--
-- A seal lasts the caller's trust plus MARGIN_MS, so that it outlives that trust even measured by
-- another node's clock after a failover (the seal is replicated: the caller WAITs for it), as long as
-- the nodes' clocks are within MARGIN_MS of each other.
-- include: clock
local stock_key, log_key, meta_key = KEYS[1], KEYS[2], KEYS[3]
local trust_ms, known, most = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local MARGIN_MS = 1000

local stock = redis.call('GET', stock_key)
if not stock or tonumber(stock) ~= 0 then
  return {0}
end
local meta = redis.call(
  'HMGET', meta_key, 'parts', 'standby', 'frozen_until', 'sealed_until', 'sealed_since', 'seal_barred_until'
)
local now = clock_ms()
local frozen = meta[3] and now < tonumber(meta[3])
local barred = meta[6] and now < tonumber(meta[6])
if meta[1] or tonumber(meta[2] or '0') > 0 or frozen or barred then
  return {0}
end
if redis.call('HLEN', log_key) > most then
  return {0}
end
local until_ms = tonumber(meta[4] or '0')
local since = meta[5]
if now >= until_ms or not since then
  since = tostring(now)
end
redis.call('HSET', meta_key, 'sealed_until', math.max(until_ms, now + trust_ms + MARGIN_MS), 'sealed_since', since)
if since == known then
  return {1, since}
end
return {1, since, redis.call('HKEYS', log_key)}
