-- lead: which job makes the images of identical requests across shards. Admission
-- joins identical requests within its own shard (admit.lua); with several shards, the
-- leader of each shard asks here before it calls an upstream, and all but the first wait
-- for that one's outcome (docs/api.md#cache). The key lives outside any shard
-- (`keys.leading`), one key a call.
-- Called through `Lead` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 the leading key of the requests' cache key
-- ARGV: 1 this job's key, 2 how long the lead lasts at most (ms; 0: give it up, if this
--       job holds it), 3 a job that ended without its images ('' none): the lead is
--       taken from it
-- Returns the key of the job that leads now (ARGV 1: this one; '' once given up).
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == '0' then
  if holder == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return ''
end
if not holder or holder == ARGV[1] or holder == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return holder
