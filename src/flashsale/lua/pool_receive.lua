-- The end of a drain (see drain.lua): add the drained units to the pool and delete the transfer's
-- record, in one step, so they are added once.
--
-- KEYS[1] fs:{sku}:pool
-- KEYS[2] fs:{sku}:transfers  hash id -> JSON {dir: in, part, want, ts}
-- ARGV[1] transfer id
-- ARGV[2] units drained
--
-- Returns 1 when added now, 0 when the record was gone (added before).
local pool_key, transfers_key = KEYS[1], KEYS[2]
local id, qty = ARGV[1], tonumber(ARGV[2])
if redis.call('HDEL', transfers_key, id) == 0 then
  return 0
end
redis.call('INCRBY', pool_key, qty)
return 1
