-- promote: the in-flight leader failed or was cancelled; a job that waited for it runs
-- in its place (charged now, what it would have cost) instead of failing with it.
-- Called through `Promote` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 follower job, 2 its account, 3 its ledger, 4 queue, 5 in-flight leader,
--       6 webhook schedule, 7 the client token the follower was made with (its `token`;
--       unused without), 8 its account's running jobs (the concurrency slots), 9 the
--       leader released (ARGV 6; any key of the slot when none)
-- ARGV: 1 now_ms, 2 lease_ms, 3 job_id, 4 retention_ms, 5 ledger_keep_ms (older ledger
--       entries are trimmed; 0 = keep all), 6 the leader released (its job key; '' when
--       none is in flight any more)
-- Returns 'promoted', 'poor' (failed: its account, or its client token's budget, cannot
-- pay), 'left' (cancelled, nothing charged: its waiting clients left it, `left_by_all`
-- in record.lua; run, it would only be cancelled once a worker reached it), 'skip'
-- (it had ended), 'moved' (another release of the same leader promoted a
-- waiter already: KEYS 5 names another job; nothing to do) or 'completed' (the leader
-- completed after all, a cancel having lost the race, or its worker dying before
-- settle.lua ran: its outcome is the waiters', not a run of their own).
-- A job made with a client token is paid from the token's budget as at admission
-- (`spent` grows; finish.lua gives it back on a refund). A promoted job keeps the
-- concurrency slot it took to wait (admit.lua), its lease renewed from now (taken again
-- should it have lapsed; never refused: it was accepted already), freed when it ends
-- (finish.lua); one that fails here gives it back.
-- Runs inside once.lua (`job` is the record): sent again, it charges and queues nothing
-- more.
-- include: ledger.lua
if again then
  local ended = {failed = 'poor', cancelled = 'left'}
  return ended[job['status']] or 'promoted'
end
if (redis.call('GET', KEYS[5]) or '') ~= ARGV[6] then return 'moved' end
if ARGV[6] ~= '' then
  local leader = load_job(KEYS[9])
  if leader and leader['status'] == 'completed' then return 'completed' end
end
if not job or job['status'] ~= 'queued' then return 'skip' end
mark()
local price = tonumber(job['price'] or '0')
local credits = tonumber(redis.call('HGET', KEYS[2], 'credits') or '0')
local token = (job['token'] or '') ~= ''
local poor = nil
if token then  -- spent from the token as at admission: a live token with the budget
  local t = redis.call('HMGET', KEYS[7], 'max_credits', 'spent', 'revoked', 'expires')
  if not t[1] or t[3] == '1' or tonumber(t[4] or '0') <= tonumber(ARGV[1]) then
    poor = 'its client token had expired or been revoked'
  elseif tonumber(t[1]) - tonumber(t[2] or '0') < price then
    poor = "its client token's budget was not enough"
  end
end
if credits < price then poor = 'there were not enough credits' end
if left_by_all(job) then
  job['status'], job['error'] = 'cancelled', 'cancelled: its client left before it started'
elseif poor then
  job['status'] = 'failed'
  job['error'] = 'the identical request this job waited for failed, and ' .. poor ..
    ' to run it again'
end
if job['status'] ~= 'queued' then
  redis.call('HINCRBY', KEYS[2], 'credits_saved', -price)  -- it saved nothing (finish.lua)
  job['completed_at'] = tonumber(ARGV[1])
  save_job(KEYS[1], job)
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
  redis.call('ZREM', KEYS[8], ARGV[3])
  if (job['webhook_url'] or '') ~= '' then
    redis.call('ZADD', KEYS[6], 'NX', ARGV[1], KEYS[1])
  end
  return job['status'] == 'failed' and 'poor' or 'left'
end
if price > 0 then
  local balance = redis.call('HINCRBY', KEYS[2], 'credits', -price)
  ledger_add(KEYS[3], tonumber(ARGV[1]), tonumber(ARGV[5] or '0'), -price, 'charge', ARGV[3],
    balance)
  if token then redis.call('HINCRBY', KEYS[7], 'spent', price) end
end
job['cost'], job['promoted'] = price, 1  -- (its cache statistics: finish.lua)
save_job(KEYS[1], job)
redis.call('HINCRBY', KEYS[2], 'credits_saved', -price)
redis.call('ZADD', KEYS[8], tonumber(ARGV[1]) + tonumber(ARGV[2]), ARGV[3])
redis.call('XADD', KEYS[4], '*', 'job', KEYS[1])
redis.call('SET', KEYS[5], KEYS[1], 'PX', tonumber(ARGV[4]))  -- as long as records live
return 'promoted'
