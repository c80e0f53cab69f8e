-- start: a worker takes a job. Marks it processing, counts the attempt, (re)takes its
-- concurrency slot as a lease the worker keeps renewing, and answers with the record:
-- taking a job is one round trip. Runs inside once.lua: sent again, it counts nothing.
-- Called through `Start` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 job, 2 running   ARGV: 1 now_ms, 2 lease_ms, 3 job_id
-- Returns {status before, attempts, field, value, ...}: the record as started; a job
-- already ended is left untouched ({status, 0}), a missing one is {'missing', 0}.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing', 0} end
if status == 'completed' or status == 'failed' or status == 'cancelled' then
  return {status, 0}
end
local attempts
if again then
  attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts'))
else
  attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('HSET', KEYS[1], 'status', 'processing')
  redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1])
  redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[3])
  mark()
end
return {status, attempts, unpack(redis.call('HGETALL', KEYS[1]))}
