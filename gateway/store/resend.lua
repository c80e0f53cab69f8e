-- resend: deliver an ended job's webhook again, now. A retry waiting its turn (hours, late
-- in the schedule) is brought to now, its attempts counted on; an attempt under way
-- (leased by claim.lua) is left to run, never sent twice at once; with no delivery
-- scheduled, a new round starts now, its attempts counted from 1.
-- Called through `Resend` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 schedule, 2 leases, 3 job   ARGV: 1 now_ms
-- Returns 'now' (a waiting retry brought forward), 'sending' (under way: nothing done),
-- 'again' (a new round) or 'missing' (the job's record is gone).
-- include: record.lua
local now = tonumber(ARGV[1])
if redis.call('ZSCORE', KEYS[1], KEYS[3]) then
  if tonumber(redis.call('HGET', KEYS[2], KEYS[3]) or '0') > now then return 'sending' end
  redis.call('ZADD', KEYS[1], now, KEYS[3])
  return 'now'
end
local job = load_job(KEYS[3])
if not job then return 'missing' end
job['webhook_attempts'], job['webhook_attempts_op'] = 0, nil
save_job(KEYS[3], job)
redis.call('ZADD', KEYS[1], now, KEYS[3])
return 'again'
