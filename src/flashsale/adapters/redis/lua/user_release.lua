-- Give back the holds of attempts that deducted nothing, told `sold_out` or `error` (see user_hold.lua):
-- each such attempt leaves the record of its user's token; once none is left there, the hold is freed and
-- the user may buy those units elsewhere within the limit. Every attempt of a token takes (or rides) a
-- hold before it can be sold, and is recorded by its id; one with an unclear answer (`pending`), or whose
-- producer died, is never released, so a hold is freed only once every attempt that rode it was told it
-- deducted nothing, and any later attempt takes a hold again. Run again, it frees nothing more.
--
-- KEYS[1] fs:{#users:n}:sku:epoch  the holds (see user_hold.lua)
-- ARGV[1] token, ARGV[2] user id, ARGV[3] attempt id: three such per attempt that deducted nothing
--
-- Returns the units freed. An attempt not on record (a release run again) frees nothing, nor does a hold
-- marked kept (`*`, see user_hold.lua): the mark is never taken off the record. It writes (a counter at
-- least), so that a WAIT after it proves a replica holds it; but on a key that is gone (the holds of an
-- earlier load, dropped by the load after it) there is nothing to free or prove, and it writes nothing,
-- lest the counter bring the key back for good.
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then
  return 0
end
local freed = 0
for i = 1, #ARGV - 2, 3 do
  local token, user, attempt = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local attempts = cjson.decode(redis.call('HGET', key, 'a:' .. token) or '{}')
  local mine = attempts[user]
  if mine and mine[attempt] then
    mine[attempt] = nil
    if next(mine) == nil then
      attempts[user] = nil
      local raw = redis.call('HGET', key, 'h:' .. token) or '{}'
      if string.sub(raw, 1, 1) == '{' then  -- a hold written before holds named their user is kept
        local holds = cjson.decode(raw)
        local units = tonumber(holds[user] or 0)
        holds[user] = nil
        if next(holds) then
          redis.call('HSET', key, 'h:' .. token, cjson.encode(holds))
        else
          redis.call('HDEL', key, 'h:' .. token)
        end
        redis.call('HINCRBY', key, 'b:' .. user, -units)
        freed = freed + units
      end
    end
    if next(attempts) then
      redis.call('HSET', key, 'a:' .. token, cjson.encode(attempts))
    else
      redis.call('HDEL', key, 'a:' .. token)
    end
  end
end
redis.call('HINCRBY', key, 'calls', 1)
return freed
