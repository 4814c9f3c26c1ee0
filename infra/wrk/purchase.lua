-- POST /purchase with a token of its own per request, for Debian's wrk (see `make wrk`).
--
--   wrk -t1 -c200 -d10s -s infra/wrk/purchase.lua http://127.0.0.1:8000 -- SKU RUN USERS
--
-- SKU   the SKU every request buys (one unit)
-- RUN   a prefix that makes this run's tokens unique (default: the time)
-- USERS how many buyers the requests rotate over (default 100000: no per-user limit is reached)
local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  sku = args[1] or "wrk"
  run = args[2] or tostring(os.time())
  users = tonumber(args[3] or "100000")
  counter = 0
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"sku":"%s","user_id":"u%d","qty":1,"token":"%s-%d-%d"}', sku, counter % users, run, id, counter
  )
  return wrk.format("POST", "/purchase", {["Content-Type"] = "application/json"}, body)
end
