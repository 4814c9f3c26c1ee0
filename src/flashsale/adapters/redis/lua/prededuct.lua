-- Pre-deduct stock for the purchases one half message carries, atomically: the producer's local transaction.
--
-- KEYS[1] fs:{sku}:stock  remaining stock (integer string)
-- KEYS[2] fs:{sku}:log    hash token -> JSON log entry
-- KEYS[3] fs:{sku}:users  hash user -> quantity bought (kept only when a per-user limit is set)
-- KEYS[4] fs:{sku}:meta   hash: initial, per_user_limit, sold_out, frozen_until, pay_within_ms, counters;
--                         for a partition also standby (its second sub-domain), threshold, epoch and closed
-- KEYS[5] fs:{sku}:tx     hash message id -> JSON record of that message's pre-deduct
-- ARGV[1] message id of the half message (written into every log entry it deducts)
-- ARGV[2] sku, or the partition `sku#n` the keys belong to (written into the log entries)
-- ARGV[3] for a partition, the epoch of the layout the caller placed the purchases by; '' for a SKU
-- ARGV[4..] token, user id, quantity: one triple per purchase, in arrival order
--
-- Returns a flat array, {code, remaining, detail} per purchase in ARGV order:
--   1 accepted        remaining after it, detail = its new log entry
--   2 duplicate       token seen before; detail = that entry (it names the message that deducted it)
--   3 sold out        remaining = 0 (also while the SKU is sealed, seal.lua: detail = 'sealed')
--   4 insufficient    0 < remaining < qty
--   5 limit exceeded  detail = quantity the user already bought
--   6 invalid qty
--   7 unknown sku     the SKU was never loaded (nothing at all is written)
--   8 fenced          the checker rolled this message back before it ran; detail = the record
--   9 closed          a partition closed for good, and the token never seen here: sell it elsewhere
--  10 stale layout    ARGV[3] is not this partition's load, or the partition is gone, or the SKU is
--                     being loaded again (meta `frozen_until`): the caller's layout is out of date;
--                     nothing is deducted, and the message's record says 'stale'
--
-- A rerun of a message that ran here gives each purchase the outcome of that run, and still writes (a
-- counter), so that a WAIT after it proves a replica holds the record and the entries it answers from.
--
-- The purchases are decided in order, each seeing the ones before it, then written at the end: an error
-- while deciding leaves nothing behind. The record in KEYS[5] makes the script idempotent per message:
-- run again, it deducts nothing and gives each purchase the outcome of the first run (a rejection's
-- `remaining` is then the stock left now).
--
-- A partition sells from its active sub-domain (KEYS[1]). When that cannot cover a purchase, or falls
-- below the threshold, the standby sub-domain is switched in (its units join the active ones) and the
-- standby is left empty for the pool to refill. `remaining` counts both sub-domains.
--
-- A closed partition (see close.lua) sells nothing more, so that the tokens it never saw may be sold
-- on their next partition: a token it did see still gets its original answer.
-- include: clock
local stock_key, log_key, users_key, meta_key, tx_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local gid, sku, epoch = ARGV[1], ARGV[2], ARGV[3]
local parent = string.match(sku, '^(.-)#')
local part = nil
if parent then
  sku, part = parent, sku
end
local n = math.floor((#ARGV - 3) / 3)
local out = {}
local DAY_MS = 86400000

local function answer(code, remaining, detail)
  out[#out + 1] = code
  out[#out + 1] = remaining
  out[#out + 1] = detail
end

local stock_raw = redis.call('GET', stock_key)
local stock = tonumber(stock_raw or '-1')
local meta = redis.call(
  'HMGET', meta_key, 'per_user_limit', 'standby', 'threshold', 'epoch', 'closed', 'frozen_until', 'pay_within_ms',
  'sealed_until'
)
local limit = tonumber(meta[1] or '0') or 0
local standby = tonumber(meta[2] or '0') or 0
local threshold = tonumber(meta[3] or '0') or 0
local closed = meta[5] == '1'
local pay_within = tonumber(meta[7] or '0') or 0
local switches = 0
local ts = clock_ms()
-- A producer may be answering `sold_out` from a copy of the log (seal.lua): until the seal ends, units
-- that came back stay off sale, so that no token is deducted that its copy does not hold.
local sealed = meta[8] and ts < tonumber(meta[8])

-- A message that ran here before gets the outcome of that run, whatever happened since. A rerun still
-- writes (a counter): a WAIT after it then proves a replica holds what it answers from.
local record = redis.call('HGET', tx_key, gid)
if record then
  if stock_raw then
    redis.call('HINCRBY', meta_key, 'reruns', 1)
  else
    redis.call('PEXPIRE', tx_key, DAY_MS)
  end
  local tx = cjson.decode(record)
  local on_sale = sealed and 0 or stock + standby
  for i = 1, n do
    local token, user = ARGV[3 * i + 1], ARGV[3 * i + 2]
    if tx['state'] == 'fenced' then
      answer(8, on_sale, record)
    elseif tx['state'] == 'stale' then
      answer(10, -1, '')
    else
      local code = tonumber(string.sub(tx['codes'], i, i)) or 6
      local seen = redis.call('HGET', log_key, token)
      if (code == 1 or code == 2) and seen then
        local entry = cjson.decode(seen)
        answer(code, code == 1 and tonumber(entry['to']) or on_sale, seen)
      elseif code == 5 then
        answer(5, on_sale, redis.call('HGET', users_key, user) or '0')
      else
        answer(code, on_sale, '')
      end
    end
  end
  return out
end

-- A partition dropped by a new load, or loaded by another layout than the caller's, or any SKU being
-- loaded again right now (frozen): the caller reads the layout again. Nothing is deducted; the record
-- says so to the checker and the consumer (on keys that are gone, it expires).
-- (A partition loaded before partitions knew their epoch has none, and takes any.)
local frozen = meta[6] and ts < tonumber(meta[6])
if frozen or (part and (not stock_raw or (meta[4] and meta[4] ~= epoch))) then
  redis.call('HSET', tx_key, gid, cjson.encode({state = 'stale', ts = ts}))
  if not stock_raw then
    redis.call('PEXPIRE', tx_key, DAY_MS)
  end
  for i = 1, n do
    answer(10, -1, '')
  end
  return out
end

if not stock_raw then
  for i = 1, n do
    answer(7, -1, '')
  end
  return out
end

-- Decide every purchase first.
local codes, entries, taken, bought, changed = {}, {}, {}, {}, {}
local deducted_qty, deducted_count = 0, 0
for i = 1, n do
  local token, user, qty_arg = ARGV[3 * i + 1], ARGV[3 * i + 2], ARGV[3 * i + 3]
  local code, detail = 0, ''
  if not string.match(qty_arg, '^[1-9]%d*$') or #qty_arg > 9 then
    code = 6
  else
    local qty = tonumber(qty_arg)
    if standby > 0 and not closed and not sealed and (stock < qty or stock < threshold) then
      stock, standby, switches = stock + standby, 0, switches + 1
    end
    local seen = taken[token] or redis.call('HGET', log_key, token)
    if seen then
      code = cjson.decode(seen)['state'] == 'fenced' and 8 or 2
      detail = seen
    elseif closed then
      code = 9
    elseif sealed then
      code, detail = 3, 'sealed'
    elseif stock < qty then
      code = stock == 0 and 3 or 4
    else
      if limit > 0 and bought[user] == nil then
        bought[user] = tonumber(redis.call('HGET', users_key, user) or '0')
      end
      if limit > 0 and bought[user] + qty > limit then
        code = 5
        detail = tostring(bought[user])
      else
        code = 1
        -- With a payment deadline the order awaits payment until `due` (decide.lua); without, it is final.
        detail = cjson.encode({
          state = 'deducted', sku = sku, part = part, user = user, qty = qty,
          from = stock + standby, to = stock + standby - qty, ts = ts, msg = gid,
          order = pay_within > 0 and 'awaiting' or nil, due = pay_within > 0 and ts + pay_within or nil,
        })
        stock = stock - qty
        taken[token] = detail
        if limit > 0 then
          bought[user] = bought[user] + qty
          changed[user] = true
        end
        entries[#entries + 1] = {token, detail}
        deducted_qty = deducted_qty + qty
        deducted_count = deducted_count + 1
      end
    end
  end
  codes[i] = tostring(code)
  answer(code, sealed and 0 or stock + standby, detail)
end

-- Then write.
for _, pair in ipairs(entries) do
  redis.call('HSET', log_key, pair[1], pair[2])
end
if switches > 0 then
  redis.call('HSET', meta_key, 'standby', 0)
  redis.call('HINCRBY', meta_key, 'switches', switches)
end
if deducted_count > 0 or switches > 0 then
  redis.call('SET', stock_key, stock)
end
if deducted_count > 0 then
  for user in pairs(changed) do
    redis.call('HSET', users_key, user, bought[user])
  end
  redis.call('HINCRBY', meta_key, 'deducted_qty', deducted_qty)
  redis.call('HINCRBY', meta_key, 'deducted_count', deducted_count)
  -- Tokens the producers' copies of the log lack (seal.lua): the next seal starts a new run and sends the
  -- log again. (Only after a seal ended: none deducts while one runs. A run's end told by this, not by a
  -- clock, holds however far the nodes' clocks drift.)
  redis.call('HDEL', meta_key, 'sealed_since')
  if stock == 0 and standby == 0 then
    redis.call('HSET', meta_key, 'sold_out', 1)
  end
end
redis.call('HSET', tx_key, gid, cjson.encode({
  state = 'ran', codes = table.concat(codes), accepted = deducted_count, ts = ts,
}))
return out
