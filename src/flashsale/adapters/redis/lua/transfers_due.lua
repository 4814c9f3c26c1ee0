-- The transfers under way that a sweep should complete: those older than a given age on Redis's clock
-- (their refiller died, or is very slow). Neither the producer's clock nor its host's enters it.
--
-- KEYS[1] fs:{sku}:transfers  hash id -> JSON {dir, part, qty|want, ts (ms, Redis's clock)}
-- KEYS[2] fs:{sku}:meta       loaded_ms (the load's epoch), counters
-- ARGV[1] age, ms
-- ARGV[2] the epoch of the caller's layout
--
-- Returns a flat array {id, record, ...}, or {-2} for another load. It writes (a counter), so that a
-- WAIT after it proves a replica holds the records it hands out: a sweep never completes a transfer
-- that a failover could take back.
-- include: clock
local transfers_key, meta_key = KEYS[1], KEYS[2]
local age, epoch = tonumber(ARGV[1]), ARGV[2]
if redis.call('HGET', meta_key, 'loaded_ms') ~= epoch then
  return {-2}
end
redis.call('HINCRBY', meta_key, 'sweeps', 1)
local now_ms = clock_ms()
local out = {}
local all = redis.call('HGETALL', transfers_key)
for i = 1, #all, 2 do
  if now_ms - tonumber(cjson.decode(all[i + 1])['ts']) >= age then
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  end
end
return out
