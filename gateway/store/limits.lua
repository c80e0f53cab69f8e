-- limits: what admit.lua and auth.lua share, spliced into each where it reads
-- `-- include: limits.lua` (see `source` in scripts.py), so both read a key's limits
-- and its per-minute window the same way.
--
-- A key's limits are its plan's (`plans`: `;name:rpm:concurrency:daily;...`, -1 =
-- unlimited, made from the settings by admission.py's `plan_table`) with the key's own
-- overrides: its account's `rpm`, `concurrency` and `daily` fields (missing or empty: the
-- plan's; negative: unlimited). Returns rpm, concurrency, daily (-1: unlimited).
local function key_limits(plans, plan, rpm, conc, daily)
  local r, c, d = -1, -1, -1
  local name = ';' .. plan .. ':'  -- a plain find, not a pattern: half the time of gmatch
  local at = string.find(plans, name, 1, true)
  if at then
    local pr, pc, pd = string.match(plans, '^(-?%d+):(-?%d+):(-?%d+)', at + #name)
    r, c, d = tonumber(pr), tonumber(pc), tonumber(pd)
  end
  local function own(raw, default)
    if not raw or raw == '' then return default end
    local v = tonumber(raw)
    if v < 0 then return -1 end
    return v
  end
  return own(rpm, r), own(conc, c), own(daily, d)
end

-- The per-minute window, a sorted set of admission times (ms): forget what left it and
-- answer how many remain.
local function window_used(rate, now)
  redis.call('ZREMRANGEBYSCORE', rate, '-inf', now - 60000)
  return redis.call('ZCARD', rate)
end

-- When the window's oldest admission leaves it (unix seconds, rounded up; a minute from
-- now when it is empty): the X-RateLimit-Reset header.
local function window_reset(rate, now)
  local oldest = redis.call('ZRANGE', rate, 0, 0, 'WITHSCORES')
  return math.ceil((tonumber(oldest[2] or now) + 60000) / 1000)
end
