-- start: a worker takes a job. Marks it processing, counts the attempt, (re)takes its
-- concurrency slot as a lease the worker keeps renewing, and answers with the record:
-- taking a job is one round trip. Runs inside once.lua (`job` is the record): sent
-- again, it counts nothing.
-- Called through `Start` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 job, 2 running   ARGV: 1 now_ms, 2 lease_ms, 3 job_id
-- Returns {status before, attempts, the record as started (JSON)}: a job already ended
-- is left untouched ({status, 0}), a missing one is {'missing', 0}, and so is a queued
-- one its waiting clients all left ({'left', 0, the record}: `left_by_all`, record.lua;
-- the worker cancels it, docs/api.md#waiting).
if not job then return {'missing', 0} end
local status = job['status']
if status == 'completed' or status == 'failed' or status == 'cancelled' then
  return {status, 0}
end
if status == 'queued' and left_by_all(job) then return {'left', 0, cjson.encode(job)} end
if again then return {status, tonumber(job['attempts']), cjson.encode(job)} end
job['attempts'] = tonumber(job['attempts'] or '0') + 1
job['status'] = 'processing'
if not job['started_at'] then job['started_at'] = tonumber(ARGV[1]) end
redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[3])
mark()
return {status, job['attempts'], save_job(KEYS[1], job)}
