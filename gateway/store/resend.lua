-- resend: deliver an ended job's webhook again, now. A retry waiting its turn (hours off,
-- late in the schedule) is brought to now, its attempts counted on; one due within two
-- leases may be an attempt under way (claim.lua pushes a taken one a lease ahead; two,
-- for the clocks of other hosts) and is left to run, never sent twice at once, as is a
-- retry that near; with no delivery scheduled, a new round starts now, counted from 1.
-- Called through `Resend` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 schedule, 2 job   ARGV: 1 now_ms, 2 lease_ms (claim.lua's)
-- Returns 'now' (a waiting retry brought forward), 'sending' (under way or about to be:
-- nothing done), 'again' (a new round) or 'missing' (the job's record is gone).
-- include: record.lua
local now = tonumber(ARGV[1])
local due = redis.call('ZSCORE', KEYS[1], KEYS[2])
if due then
  if tonumber(due) <= now + 2 * tonumber(ARGV[2]) then return 'sending' end
  redis.call('ZADD', KEYS[1], now, KEYS[2])
  return 'now'
end
local job = load_job(KEYS[2])
if not job then return 'missing' end
job['webhook_attempts'], job['webhook_attempts_op'] = 0, nil
save_job(KEYS[2], job)
redis.call('ZADD', KEYS[1], now, KEYS[2])
return 'again'
