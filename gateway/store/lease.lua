-- lease: keep the concurrency slots of one account's running jobs, renewed by the worker
-- running them. A slot that lapsed meanwhile (no renewal for longer than a lease: Redis
-- away, the worker's loop stalled) and was dropped by an admission since is taken again
-- for a job still processing: the admissions made while it had lapsed stand (the
-- account may run one over its plan until a job ends), but no more are let in; a job
-- that ended meanwhile gets none back.
-- Called through `Lease` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 the account's running set, 2... the jobs' records
-- ARGV: 1 until_ms, 2... the jobs' ids (in the order of their records)
-- Returns how many lapsed slots it took again.
-- include: record.lua
local until_ms, taken = tonumber(ARGV[1]), 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], until_ms, ARGV[i])
  else
    local job = load_job(KEYS[i])
    if job and job['status'] == 'processing' then
      redis.call('ZADD', KEYS[1], until_ms, ARGV[i])
      taken = taken + 1
    end
  end
end
return taken
