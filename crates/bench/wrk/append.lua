-- wrk script: single-event appends, each connection to its own stream (W10 with a light client).
-- wrk -t1 -c32 -d10s -s crates/bench/wrk/append.lua http://127.0.0.1:7610
local counter = 0
local payload = '{"type":"Measured","data":{"pad":"' .. string.rep("x", 180) .. '"}}'
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
function init(args)
  requests = 0
end
function request()
  requests = requests + 1
  -- wrk reuses one request function per thread; spread streams over 32 names per thread.
  local stream = "wrk-" .. id .. "-" .. (requests % 32)
  return wrk.format("POST", "/streams/" .. stream, {["Content-Type"] = "application/json"}, payload)
end
function response(status, headers, body)
  if status ~= 201 then
    print("unexpected status " .. status .. ": " .. body)
  end
end
