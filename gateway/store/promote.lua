-- promote: the in-flight leader failed or was cancelled; a job that waited for it runs
-- in its place (charged now, what it would have cost) instead of failing with it.
-- Called through `Promote` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 follower job, 2 its account, 3 its ledger, 4 queue, 5 in-flight leader,
--       6 webhook schedule
-- ARGV: 1 now_ms, 2 lease_ms, 3 job_id, 4 retention_ms, 5 ledger_keep_ms (older ledger
--       entries are trimmed; 0 = keep all)
-- Returns 'promoted', 'poor' (failed: not enough credits) or 'skip' (it had ended).
-- Runs inside once.lua: sent again, it charges and queues nothing more.
local f = redis.call('HMGET', KEYS[1], 'status', 'price', 'webhook_url')
if again then return f[1] == 'failed' and 'poor' or 'promoted' end
if f[1] ~= 'queued' then return 'skip' end
mark()
local price = tonumber(f[2] or '0')
local credits = tonumber(redis.call('HGET', KEYS[2], 'credits') or '0')
if credits < price then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'completed_at', ARGV[1], 'error',
    'the identical request this job waited for failed, and there were not enough ' ..
    'credits to run it again')
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
  if f[3] and f[3] ~= '' then redis.call('ZADD', KEYS[6], 'NX', ARGV[1], KEYS[1]) end
  return 'poor'
end
if price > 0 then
  local balance = redis.call('HINCRBY', KEYS[2], 'credits', -price)
  local keep = tonumber(ARGV[5] or '0')
  if keep > 0 then  -- the ledger's oldest trimmed, by whole nodes (cheap): see credit.lua
    redis.call('XADD', KEYS[3], 'MINID', '~', tonumber(ARGV[1]) - keep, '*', 'delta', -price,
      'reason', 'charge', 'job', ARGV[3], 'balance', balance)
  else
    redis.call('XADD', KEYS[3], '*', 'delta', -price, 'reason', 'charge', 'job', ARGV[3],
      'balance', balance)
  end
end
redis.call('HSET', KEYS[1], 'cost', price)
redis.call('HINCRBY', KEYS[2], 'credits_saved', -price)
redis.call('XADD', KEYS[4], '*', 'job', KEYS[1])
redis.call('SET', KEYS[5], KEYS[1], 'PX', tonumber(ARGV[2]))
return 'promoted'
