-- read_record: one job record as read.lua returns it (see there): {} when it is gone,
-- else {the record as JSON} and, for a cache hit, its entry's {urls, width, height,
-- hit_metadata, params}. Included by read.lua and auth.lua, after record.lua.
--
-- A job coalesced into an identical one in flight (admit.lua's `follow`: queued, cost
-- 0, its digest's in-flight leader another job) reads as `processing` while that leader
-- is: it is being made. Stored, it stays `queued` until the leader's worker settles it;
-- so a client polling `while (status === 'processing')`, as Doitong's guide does, waits
-- for it as for any running job.
local function as_follower(key, raw)
  local job = cjson.decode(raw)
  local digest = job['cache_key']
  if not digest or (tonumber(job['cost']) or 0) ~= 0 then return raw end
  local leader = redis.call('GET', string.match(key, '^(.-{s%d+}:)') .. 'inflight:' .. digest)
  if not leader or leader == key then return raw end
  if ((load_job(leader) or {})['status']) ~= 'processing' then return raw end
  job['status'] = 'processing'
  return cjson.encode(job)
end

local function read_record(key)
  local raw = redis.pcall('GET', key)
  local hit, digest = 0, nil
  if type(raw) == 'string' then
    if string.find(raw, '"hit":', 1, true) then
      local job = cjson.decode(raw)
      hit, digest = tonumber(job['hit']) or 0, job['cache_key']
    elseif string.find(raw, '"status":"queued"', 1, true)
      and string.find(raw, '"cache_key":', 1, true) then  -- decoded only if it may follow
      raw = as_follower(key, raw)
    end
  elseif raw then  -- a record written as a hash (record.lua)
    local job = load_job(key)
    hit, digest = tonumber(job['hit']) or 0, job['cache_key']
    raw = cjson.encode(job)
  end
  if not raw then return {} end
  if hit > 0 and digest then
    local entry = string.match(key, '^(.-{s%d+}:)') .. 'cache:' .. digest
    local e = redis.call('HMGET', entry, 'urls', 'width', 'height', 'hit_metadata',
      'params', 'until')
    if hit > 1 and tonumber(e[6]) ~= hit then  -- replaced since: its generation
      e = redis.call('HMGET', entry .. ':' .. string.format('%d', hit), 'urls', 'width',
        'height', 'hit_metadata', 'params')
    end
    return {raw, e[1] or '', e[2] or '', e[3] or '', e[4] or '', e[5] or ''}
  end
  return {raw}
end
