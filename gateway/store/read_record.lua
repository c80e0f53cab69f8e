-- read_record: one job record as read.lua returns it (see there): {} when it is gone,
-- else {the record as JSON} and, for a cache hit, its entry's {urls, width, height,
-- hit_metadata, params}. Included by read.lua and auth.lua, after record.lua.
local function read_record(key)
  local raw = redis.pcall('GET', key)
  local hit, digest = 0, nil
  if type(raw) == 'string' then
    if string.find(raw, '"hit":', 1, true) then
      local job = cjson.decode(raw)
      hit, digest = tonumber(job['hit']) or 0, job['cache_key']
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
