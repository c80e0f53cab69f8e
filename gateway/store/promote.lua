-- promote: the in-flight leader failed or was cancelled; a job that waited for it runs
-- in its place (charged now, what it would have cost) instead of failing with it.
-- Called through `Promote` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 follower job, 2 its account, 3 its ledger, 4 queue, 5 in-flight leader,
--       6 webhook schedule
-- ARGV: 1 now_ms, 2 lease_ms, 3 job_id, 4 retention_ms, 5 ledger_keep_ms (older ledger
--       entries are trimmed; 0 = keep all)
-- Returns 'promoted', 'poor' (failed: not enough credits) or 'skip' (it had ended).
-- Runs inside once.lua (`job` is the record): sent again, it charges and queues nothing
-- more.
-- include: ledger.lua
if again then return job['status'] == 'failed' and 'poor' or 'promoted' end
if not job or job['status'] ~= 'queued' then return 'skip' end
mark()
local price = tonumber(job['price'] or '0')
local credits = tonumber(redis.call('HGET', KEYS[2], 'credits') or '0')
if credits < price then
  job['status'], job['completed_at'] = 'failed', tonumber(ARGV[1])
  job['error'] = 'the identical request this job waited for failed, and there were not ' ..
    'enough credits to run it again'
  save_job(KEYS[1], job)
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
  if (job['webhook_url'] or '') ~= '' then
    redis.call('ZADD', KEYS[6], 'NX', ARGV[1], KEYS[1])
  end
  return 'poor'
end
if price > 0 then
  local balance = redis.call('HINCRBY', KEYS[2], 'credits', -price)
  ledger_add(KEYS[3], tonumber(ARGV[1]), tonumber(ARGV[5] or '0'), -price, 'charge', ARGV[3],
    balance)
end
job['cost'] = price
save_job(KEYS[1], job)
redis.call('HINCRBY', KEYS[2], 'credits_saved', -price)
redis.call('XADD', KEYS[4], '*', 'job', KEYS[1])
redis.call('SET', KEYS[5], KEYS[1], 'PX', tonumber(ARGV[2]))
return 'promoted'
