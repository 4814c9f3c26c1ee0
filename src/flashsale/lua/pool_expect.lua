-- Step 1 of a drain (the stranding rebalance): record that transfer `id` will move units of a
-- partition back to the pool, before drain.lua takes them; pool_receive.lua ends it. Whoever finds
-- the record (a refiller that died, the sweep) runs the two other steps again: each counts once.
--
-- KEYS[1] fs:{sku}:transfers  hash id -> JSON {dir: in, part, want, ts}
-- KEYS[2] fs:{sku}:meta       `moves`: transfers ever begun (a sold-out read checks none began meanwhile)
-- ARGV[1] transfer id
-- ARGV[2] partition (sku#n)
-- ARGV[3] units wanted
local now = redis.call('TIME')
local new = redis.call('HSETNX', KEYS[1], ARGV[1], cjson.encode({
  dir = 'in', part = ARGV[2], want = tonumber(ARGV[3]), ts = tonumber(now[1]) * 1000,
}))
if new == 1 then
  redis.call('HINCRBY', KEYS[2], 'moves', 1)
end
return 1
