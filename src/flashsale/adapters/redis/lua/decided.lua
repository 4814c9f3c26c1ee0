-- A fragment, not a script: scripts include it with a line `-- include: decided` (see __init__.py).
--
-- What the checker decided outlives a load's history: a message it rolled back (its record's state
-- 'fenced', or 'stale': refused while frozen or placed by another load) may still be in its producer's
-- hands, and a late pre-deduct of it must find that record and deduct nothing on the new load, where no
-- message would carry what it took.
local function decided_records(tx_key)
  local decided = {}
  local records = redis.call('HGETALL', tx_key)
  for i = 1, #records, 2 do
    local state = cjson.decode(records[i + 1])['state']
    if state == 'fenced' or state == 'stale' then
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
