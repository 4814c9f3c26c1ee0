-- A fragment, not a script: scripts include it with a line `-- include: decided` (see __init__.py).
--
-- What the checker decided outlives a load's history: a message it rolled back (its record's state
-- 'fenced', or 'stale': refused while frozen or placed by another load) may still be in its producer's
-- hands, and a late pre-deduct of it must find that record and deduct nothing on the new load, where no
-- message would carry what it took.
--
-- So does what the load discards: a message whose pre-deduct ran on the old load (record 'ran') is kept
-- as 'stale', `replaced` saying when (ms) and `accepted` how many purchases it had accepted, its
-- deductions gone with the old load on both sides (a reset, or units it never took). Applied before the
-- load and delivered again after it (its ack lost), the consumer skips it rather than filing it as a
-- deduction Redis lost; the checker rolls it back if it is still open; and its pre-deduct, asked again,
-- deducts nothing on the new load. Such a record is kept a day after it was retired (no message is
-- checked or delivered again that long after), so that the records of sale after sale do not pile up;
-- what the checker decided is kept for good.
-- include: clock
local function decided_records(tx_key)
  local decided = {}
  local records = redis.call('HGETALL', tx_key)
  local now_ms = clock_ms()
  for i = 1, #records, 2 do
    local record = cjson.decode(records[i + 1])
    local state, replaced = record['state'], tonumber(record['replaced'])
    if state == 'ran' then
      decided[#decided + 1] = records[i]
      decided[#decided + 1] = cjson.encode({
        state = 'stale', ts = record['ts'], replaced = now_ms, accepted = tonumber(record['accepted']) or 0,
      })
    elseif (state == 'fenced' or state == 'stale') and not (replaced and replaced < now_ms - 86400000) then
      decided[#decided + 1] = records[i]
      decided[#decided + 1] = records[i + 1]
    end
  end
  return decided
end

local function put_back(tx_key, decided)
  for i = 1, #decided, 200 do  -- in slices: unpack's arguments are bounded
    redis.call('HSET', tx_key, unpack(decided, i, math.min(i + 199, #decided)))
  end
end
