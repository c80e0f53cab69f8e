-- record: a job record is one JSON object stored as a string, not a hash. A hash with
-- any value longer than Redis's hash-max-listpack-value (64 bytes by default: every
-- prompt, so every params) is stored as a hash table, at over twice the bytes; the
-- string holds the same fields in about half (docs/api.md#redis-memory).
-- The record leaves out what its key says (id and account) and what is absent or the
-- default (type IMAGE, cost 0, an unset field). Nested values no script reads (metadata,
-- meta, upstream, webhook_shape) are JSON text inside it: cjson would write a number of
-- more than 14 digits, or an empty list, back changed. Numbers may be stored as strings (a
-- record written as a hash, before this format, is read as one: see load_job), so
-- readers take each through tonumber.
local function load_job(key)
  local raw = redis.pcall('GET', key)
  if type(raw) == 'string' then return cjson.decode(raw) end
  if not raw then return nil end
  -- WRONGTYPE: a record written as a hash; its fields, as they were (strings).
  local flat, job = redis.call('HGETALL', key), {}
  for i = 1, #flat, 2 do job[flat[i]] = flat[i + 1] end
  return job
end
-- Stores the record, keeping the key's time to live (SET replaces a hash too); returns
-- the JSON stored.
local function save_job(key, job)
  local raw = cjson.encode(job)
  redis.call('SET', key, raw, 'KEEPTTL')
  return raw
end
-- Whether every client that waited on the job's answer has left it (docs/api.md#waiting):
-- each leaving counts in `left`, each coming back for it (the same request again) in
-- `back` (both through patch.lua's count, once a call); an identical request that
-- follows it (admit.lua's cache) is one who never leaves (`followed`).
local function left_by_all(job)
  return not job['followed'] and tonumber(job['left'] or '0') > tonumber(job['back'] or '0')
end
-- Sets a field from a decoded JSON object: null removes it.
local function set(job, name, value)
  if value == cjson.null then job[name] = nil else job[name] = value end
end
