-- read: job records, each whole in one round trip. A cache hit's record does not copy
-- its outcome (admit.lua): it holds `hit` (the entry's generation, its `until`; 1 in
-- records made before generations) and the entry's digest (`cache_key`), and its urls,
-- width, height, metadata and params are those of that cache entry (its shard's
-- `cache:<digest>`, in the job's slot: the same `{sN}` tag), read here with it, or of
-- the generation it replaced, kept as `cache:<digest>:<until>` (entry_write.lua). The
-- entry lives at least as long as every hit that refers to it (admit.lua extends it).
-- Called through `Read` in scripts.py (named keys, a typed reply), which fills in what
-- the record leaves out (record.lua) and a hit's outcome.
-- KEYS: the job records (of one shard)   ARGV: none
-- Returns, per key: {} for a record that is gone; else {the record as JSON} and, for a
-- hit, the entry's {urls, width, height, hit_metadata, params} after it.
-- include: record.lua
local out = {}
for i, key in ipairs(KEYS) do
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
  if not raw then
    out[i] = {}
  elseif hit > 0 and digest then
    local entry = string.match(key, '^(.-{s%d+}:)') .. 'cache:' .. digest
    local e = redis.call('HMGET', entry, 'urls', 'width', 'height', 'hit_metadata',
      'params', 'until')
    if hit > 1 and tonumber(e[6]) ~= hit then  -- replaced since: its generation
      e = redis.call('HMGET', entry .. ':' .. string.format('%d', hit), 'urls', 'width',
        'height', 'hit_metadata', 'params')
    end
    out[i] = {raw, e[1] or '', e[2] or '', e[3] or '', e[4] or '', e[5] or ''}
  else
    out[i] = {raw}
  end
end
return out
