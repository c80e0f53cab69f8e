-- read: job records, each whole in one round trip. A cache hit's record does not copy
-- its outcome (admit.lua): it holds `hit` = '1' and the entry's digest (`cache_key`),
-- and its urls, width, height, metadata and params are read here from that cache entry
-- (its shard's `cache:<digest>`, in the job's slot: the same `{sN}` tag). The entry
-- lives at least as long as every hit that refers to it (admit.lua extends it). The
-- record's id and account are its key's; its completed_at, its created_at.
-- Called through `Read` in scripts.py (named keys, a typed reply).
-- KEYS: the job records (of one shard)   ARGV: none
-- Returns one flat {field, value, ...} per key; empty for a record that is gone.
local out = {}
for i, key in ipairs(KEYS) do
  local record = redis.call('HGETALL', key)
  local f = {}
  for j = 1, #record, 2 do f[record[j]] = record[j + 1] end
  if f['hit'] == '1' and f['cache_key'] then
    local function add(name, value)
      if value and not f[name] then
        record[#record + 1], record[#record + 2] = name, value
      end
    end
    -- What admit.lua left out of the record: the key's, the defaults, the entry's.
    local account, id = string.match(key, ':a:([^:]+):job:(.+)$')
    add('id', id)
    add('account', account)
    add('completed_at', f['created_at'])
    local entry = string.match(key, '^(.-{s%d+}:)') .. 'cache:' .. f['cache_key']
    local e = redis.call('HMGET', entry, 'urls', 'width', 'height', 'hit_metadata',
      'params')
    add('urls', e[1])
    add('width', e[2])
    add('height', e[3])
    add('metadata', e[4])
    add('params', e[5])
  end
  out[i] = record
end
return out
