-- entry: a cache entry copied into another shard (cache.py: each shard holds the shared
-- cache's entries in its own slot), the one it replaces kept for its hits.
-- Called through `Entry` in scripts.py (named keys and arguments).
-- KEYS: 1 the cache entry
-- ARGV: 1 urls, 2 width, 3 height, 4 metadata, 5 hit_metadata, 6 params, 7 now_ms,
--       8 retention_ms
-- Returns 1.
-- include: entry_write.lua
write_entry(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6],
  tonumber(ARGV[7]), tonumber(ARGV[8]))
return 1
