-- wrk script: POST one fixed body with the inference key, and print results as one JSON line.
-- Usage: WRK_AUTH="Bearer <key>" wrk -t1 -c16 -d10s -s bench/wrk/post.lua <url> -- <body file> <content type>
-- The key comes from the environment so it never shows up in a process listing; an empty WRK_AUTH
-- sends no Authorization header (for a server started with token auth off).

local request_bytes

function init(args)
  local path, content_type = args[1], args[2] or "application/json"
  if path == nil then
    error("post.lua: pass the body file after '--', e.g. -- body.json application/json")
  end
  local file = assert(io.open(path, "rb"), "post.lua: cannot open body file " .. path)
  local body = file:read("*a")
  file:close()
  local headers = { ["Content-Type"] = content_type }
  local auth = os.getenv("WRK_AUTH")
  if auth ~= nil and auth ~= "" then
    headers["Authorization"] = auth
  end
  -- More headers, one "Name: value" per line (e.g. Inference-Header-Content-Length for binary OIP bodies).
  for line in string.gmatch(os.getenv("WRK_HEADERS") or "", "[^\n]+") do
    local name, value = string.match(line, "^([^:]+):%s*(.*)$")
    if name ~= nil then
      headers[name] = value
    end
  end
  -- Build the request once: building it per call costs wrk CPU that the server would otherwise get.
  request_bytes = wrk.format("POST", nil, headers, body)
end

function request()
  return request_bytes
end

-- Latencies are in microseconds; "errors_status" counts HTTP statuses > 399.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d, "mean_us": %.1f, "errors_connect": %d, "errors_read": %d, ' ..
    '"errors_write": %d, "errors_status": %d, "errors_timeout": %d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.status, e.timeout))
end
