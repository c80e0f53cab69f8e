-- finish: a job ends (completed, failed or cancelled), exactly once.
-- Frees its concurrency slot and, for failed or cancelled, refunds its whole charge.
-- A job with a webhook URL is put on the delivery schedule in the same step, so an
-- ended job's webhook is never forgotten.
-- Ending an ended job changes nothing, so a second worker or a late cancel is harmless;
-- the same end sent again (once.lua) answers as the first did: this call ended it.
-- A running job that is cancelled is announced on its shard's cancellation log, which
-- workers read once a second instead of each job checking its status on every poll.
-- Called through `Finish` in scripts.py (named keys and arguments, a typed reply).
-- A refunded job made with a client token gives its charge back to the token's budget.
-- KEYS: 1 job, 2 running, 3 account, 4 ledger, 5 webhook schedule, 6 cancellation log,
--       7 the client token the job was made with (the job's `token`; unused without)
-- ARGV: 1 status, 2 now_ms, 3 job_id, 4 refund (0/1), 5 retention_ms, 6 ledger_keep_ms
--       (older ledger entries are trimmed; 0 = keep all), 7 JSON object: the record's
--       fields the end sets (its outcome or its error; null: removed), 8 the status
--       the job must still have to be ended ('': any that has not ended; 'left':
--       queued and still left by every client that waited on it (`left_by_all`,
--       record.lua), the worker's cancel of it, which the same request sent again
--       meanwhile wins),
--       9 joined (0/1): it completed with the images of an identical job of another
--       shard (the worker, docs/api.md#cache), refunded: its account's cache statistics
--       count it coalesced, not a miss (a job promoted from waiting, `promoted` on its
--       record, was counted coalesced at admission)
-- The record then lives for the retention time, like its outputs.
-- include: ledger.lua
-- Returns {1, balance} when this call ended the job, {0, status} otherwise.
if not job then return {0, 'missing'} end
if again then return {1, tonumber(redis.call('HGET', KEYS[3], 'credits') or '0')} end
local status = job['status']
if status == 'completed' or status == 'failed' or status == 'cancelled' then
  return {0, status}
end
if ARGV[8] == 'left' then
  if status ~= 'queued' or not left_by_all(job) then return {0, status} end
elseif ARGV[8] ~= '' and status ~= ARGV[8] then
  return {0, status}
end
mark()
for name, value in pairs(cjson.decode(ARGV[7])) do set(job, name, value) end
job['status'], job['completed_at'] = ARGV[1], tonumber(ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[3])
local balance = tonumber(redis.call('HGET', KEYS[3], 'credits') or '0')
local cost = tonumber(job['cost'] or '0')
if ARGV[4] == '1' and cost > 0 then
  balance = redis.call('HINCRBY', KEYS[3], 'credits', cost)
  ledger_add(KEYS[4], tonumber(ARGV[2]), tonumber(ARGV[6]), cost, 'refund', ARGV[3], balance)
  job['refunded'] = cost
  if (job['token'] or '') ~= '' and redis.call('EXISTS', KEYS[7]) == 1 then
    redis.call('HINCRBY', KEYS[7], 'spent', -cost)
  end
end
-- Completed with another shard's identical job's images (ARGV 9): coalesced after all.
if ARGV[9] == '1' then
  if not job['promoted'] then
    redis.call('HINCRBY', KEYS[3], 'cache_misses', -1)
    redis.call('HINCRBY', KEYS[3], 'cache_coalesced', 1)
  end
  redis.call('HINCRBY', KEYS[3], 'credits_saved', cost)
end
-- A job that waited on an identical one (cost 0, its `price` what it would have cost:
-- admit.lua) and ends without its outcome saved its account nothing after all.
if ARGV[1] ~= 'completed' and cost == 0 and tonumber(job['price'] or '0') > 0 then
  redis.call('HINCRBY', KEYS[3], 'credits_saved', -tonumber(job['price']))
end
save_job(KEYS[1], job)
if (job['webhook_url'] or '') ~= '' then redis.call('ZADD', KEYS[5], 'NX', ARGV[2], KEYS[1]) end
if ARGV[1] == 'cancelled' and status == 'processing' then
  redis.call('ZADD', KEYS[6], ARGV[2], KEYS[1])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
return {1, balance}
