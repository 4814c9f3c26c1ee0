-- Close a partition for good: it sells nothing more, so that the tokens it never saw may be sold on
-- their next partition (see records.Layout.order). Only an empty partition closes (the caller saw the
-- pool empty too), so closing strands nothing; units a refill brings later are drained back.
--
-- KEYS[1] fs:{sku#n}:stock  active sub-domain
-- KEYS[2] fs:{sku#n}:meta   standby, epoch, closed
-- ARGV[1] the epoch of the caller's layout: a partition of another load is left alone
--
-- Returns 1 when the partition is closed (now or before: a counter is written then, so that a WAIT
-- after it proves a replica holds the close), 0 when it still holds units, -1 when it belongs to
-- another load (or to none).
local stock_key, meta_key = KEYS[1], KEYS[2]
local stock = redis.call('GET', stock_key)
local meta = redis.call('HMGET', meta_key, 'standby', 'epoch', 'closed')
if not stock or (meta[2] and meta[2] ~= ARGV[1]) then
  return -1
end
if meta[3] == '1' then
  redis.call('HINCRBY', meta_key, 'reruns', 1)
  return 1
end
if tonumber(stock) + tonumber(meta[1] or '0') > 0 then
  return 0
end
redis.call('HSET', meta_key, 'closed', 1)
return 1
