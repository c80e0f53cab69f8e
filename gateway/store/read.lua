-- read: job records, each whole in one round trip. A cache hit's record does not copy
-- its outcome (admit.lua): it holds `hit` (the entry's generation, its `until`; 1 in
-- records made before generations) and the entry's digest (`cache_key`), and its urls,
-- width, height, metadata and params are those of that cache entry (its shard's
-- `cache:<digest>`, in the job's slot: the same `{sN}` tag), read here with it, or of
-- the generation it replaced, kept as `cache:<digest>:<until>` (entry_write.lua). The
-- entry outlives every hit that refers to it (entry_write.lua).
-- (read_record.lua: auth.lua reads a record with the key check the same way.)
-- Called through `Read` in scripts.py (named keys, a typed reply), which fills in what
-- the record leaves out (record.lua) and a hit's outcome.
-- KEYS: the job records (of one shard)   ARGV: none
-- Returns, per key: {} for a record that is gone; else {the record as JSON} and, for a
-- hit, the entry's {urls, width, height, hit_metadata, params} after it.
-- include: record.lua
-- include: read_record.lua
local out = {}
for i, key in ipairs(KEYS) do out[i] = read_record(key) end
return out
