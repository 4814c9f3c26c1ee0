-- Bind tokens of a partitioned SKU to the partition that deducts them: a retry must go where its
-- first attempt went, since each partition's log sees only its own slot.
--
-- KEYS[1] fs:{#claims:n}:tokens  hash "sku token" -> "epoch partition" (tokens sharded by their crc32)
-- ARGV[1] sku
-- ARGV[2] epoch: when the SKU was loaded; a claim from an earlier load of the SKU is replaced
-- ARGV[3..] token, proposed partition: one pair per purchase
--
-- Returns the partition each token is bound to, in ARGV order: the claim on record, else the proposal;
-- '' when the claim on record is from a later load than ARGV[2] (the caller's layout is out of date).
local claims = KEYS[1]
local sku, epoch = ARGV[1], tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV - 1, 2 do
  local field = sku .. ' ' .. ARGV[i]
  local held = redis.call('HGET', claims, field)
  local held_epoch, at = nil, nil
  if held then
    held_epoch, at = string.match(held, '^(%d+) (.+)$')
    held_epoch = tonumber(held_epoch)
  end
  if held_epoch and held_epoch > epoch then
    at = ''
  elseif held_epoch ~= epoch then
    at = ARGV[i + 1]
    redis.call('HSET', claims, field, ARGV[2] .. ' ' .. at)
  end
  out[#out + 1] = at
end
return out
