-- entry_write: write a cache entry, keeping the one it replaces for the hits that refer
-- to it. A hit's record holds no outcome: it names its entry's generation (the entry's
-- `until` when the hit was made, in its `hit` field: admit.lua), and read.lua reads the
-- outcome from that generation. A new outcome for the same digest (the entry past its
-- `until`, when no new hit may use it but older hits still do) must not change what
-- those read, so the entry before it is renamed `<entry>:<until>` (same slot: the key
-- keeps its `{sN}` tag), with its TTL, which already covers every hit that refers to it.
-- Included by settle.lua and entry.lua.
local function write_entry(key, urls, width, height, metadata, hit_metadata, params, now,
                           retention)
  local before = redis.call('HGET', key, 'until')
  -- The same outcome written again (a rescue settling the rest of a leader's waiters):
  -- its generation is already there, as it was.
  if before and tonumber(before) == now + retention then return end
  if before then redis.call('RENAME', key, key .. ':' .. before) end
  redis.call('HSET', key, 'urls', urls, 'width', width, 'height', height,
    'metadata', metadata, 'hit_metadata', hit_metadata, 'params', params,
    'until', now + retention)
  -- A minute past `until`: each hit's record expires at `until` as its writer counts it
  -- (admit.lua), and the minute covers the latency and clock skew between the writers.
  redis.call('PEXPIRE', key, retention + 60000)
end
