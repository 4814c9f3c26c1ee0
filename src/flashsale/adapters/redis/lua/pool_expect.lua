-- Step 1 of a drain (the stranding rebalance): record that transfer `id` will move units of a
-- partition back to the pool, before drain.lua takes them; pool_receive.lua ends it. Whoever finds
-- the record (a refiller that died, the sweep) runs the two other steps again: each counts once, and
-- a completed transfer stays known for the life of the load, so this step run again after the end
-- begins nothing.
--
-- KEYS[1] fs:{sku}:transfers  hash id -> JSON {dir: in, part, want, ts}
-- KEYS[2] fs:{sku}:meta       loaded_ms, parts; `moves`: transfers ever begun (a sold-out read checks
--                             none began meanwhile)
-- KEYS[3] fs:{sku}:done       hash id -> units: completed transfers
-- ARGV[1] transfer id
-- ARGV[2] partition (sku#n)
-- ARGV[3] units wanted
-- ARGV[4] the epoch of the caller's layout
--
-- Returns 1 when recorded now, 0 when it was already (or is complete; a counter is written), -2 for
-- another load or a partition it does not name.
-- include: clock
local transfers_key, meta_key, done_key = KEYS[1], KEYS[2], KEYS[3]
local id, part, want, epoch = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local meta = redis.call('HMGET', meta_key, 'loaded_ms', 'parts')
if meta[1] ~= epoch or not string.find(' ' .. (meta[2] or '') .. ' ', ' ' .. part .. ' ', 1, true) then
  return -2
end
if redis.call('HEXISTS', done_key, id) == 1 or redis.call('HEXISTS', transfers_key, id) == 1 then
  redis.call('HINCRBY', meta_key, 'reruns', 1)
  return 0
end
local now_ms = clock_ms()
redis.call('HSET', transfers_key, id, cjson.encode({
  dir = 'in', part = part, want = want, ts = now_ms,
}))
redis.call('HINCRBY', meta_key, 'moves', 1)
return 1
