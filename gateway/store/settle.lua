-- settle: a cacheable job completed. Store its outcome as the cache entry (living as
-- long as the outputs), and complete the jobs that waited for it with the same outputs,
-- up to `count` of them a call, so a leader with thousands of waiters never holds Redis
-- for long: the caller calls again while `more` is 1 (`first` 0: the entry is written
-- once). Each waiter completed gives back the concurrency slot it held (admit.lua).
-- The leader stays in-flight and watched until its last waiter is completed, so
-- if its caller dies part way the rescue (gateway/cache.py) settles the rest: no
-- waiter is ever forgotten.
-- Called through `Settle` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 cache entry, 2 in-flight leader, 3 followers, 4 webhook schedule, 5 watched set
-- ARGV: 1 leader job key, 2 now_ms, 3 retention_ms, 4 urls, 5 width, 6 height, 7 metadata,
--       8 the metadata a cache hit's job gets (cached, duration 0), 9 the leader's params,
--       10 keep (1, or 0: the entry answers no hit; its followers still complete),
--       11 count (waiters completed in this call, at most), 12 first (1: write the entry)
-- The entry answers hits `until` the outputs' retention ends (admit.lua); each hit's
-- record, which refers to the entry (read.lua), expires then, and the entry a minute
-- later; an entry it replaces is kept for its own hits (entry_write.lua).
-- Returns {more (1: waiters are left), the keys of the followers it completed...}.
-- include: record.lua
-- include: entry_write.lua
local now, retention = tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[12] == '1' then
  write_entry(KEYS[1], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], now,
    ARGV[10] == '1' and retention or 0)
end
local count = tonumber(ARGV[11])
local followers = redis.call('LRANGE', KEYS[3], 0, count - 1)
redis.call('LTRIM', KEYS[3], count, -1)  -- the list goes once it is empty
local more = redis.call('EXISTS', KEYS[3])
if more == 0 then
  if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
  redis.call('SREM', KEYS[5], KEYS[2])
end
local meta = cjson.decode(ARGV[7])
meta['cached'] = true
meta['coalesced'] = true
local urls, width, height = cjson.decode(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
-- A waiter's account's running set: its keys share the prefix before ':job:'
-- (`keys.job`, `keys.running`: gateway/store/keys.py), and so its slot.
local function running(job_key)
  return (string.gsub(job_key, ':job:[^:]+$', ':running'))
end
local done = {more}
for _, key in ipairs(followers) do
  local job = load_job(key)
  if not job or job['status'] == 'queued' then  -- (one that ended gave its slot back)
    redis.call('ZREM', running(key), string.match(key, ':job:([^:]+)$'))
  end
  if job and job['status'] == 'queued' then
    meta['duration'] = (now - tonumber(job['created_at'])) / 1000
    job['status'], job['completed_at'] = 'completed', now
    job['urls'], job['width'], job['height'] = urls, width, height
    job['metadata'] = cjson.encode(meta)  -- JSON text, as record.lua keeps it
    save_job(key, job)
    redis.call('PEXPIRE', key, retention)
    if (job['webhook_url'] or '') ~= '' then redis.call('ZADD', KEYS[4], 'NX', now, key) end
    done[#done + 1] = key
  end
end
return done
