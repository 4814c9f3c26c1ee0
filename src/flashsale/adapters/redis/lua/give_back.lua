-- A fragment, not a script: scripts include it with a line `-- include: give_back` (see __init__.py).
--
-- A deduction's units back on sale: the stock, the buyer's count (the limit counts what they hold), the
-- counters and the sold-out flag, all on the SKU's slot. The entry is marked returned; the caller writes it.
--
-- On a partition, the units join its active sub-domain. A closed partition sells nothing more: the
-- scheduler drains what reaches it back to the pool (pipeline/partitions.py). A partitioned SKU's limit
-- is kept by holds on another slot (user_hold.lua), which are never given back: its users hash is empty.
local function give_back(stock_key, users_key, meta_key, entry)
  local qty = tonumber(entry['qty'])
  entry['state'] = 'returned'
  local left = redis.call('INCRBY', stock_key, qty)
  if redis.call('HEXISTS', users_key, entry['user']) == 1 then
    redis.call('HINCRBY', users_key, entry['user'], -qty)
  end
  redis.call('HINCRBY', meta_key, 'returned_qty', qty)
  redis.call('HINCRBY', meta_key, 'returned_count', 1)
  redis.call('HSET', meta_key, 'sold_out', 0)
  return left
end
