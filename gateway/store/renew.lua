-- renew: reset the idle time of the queue entries this worker still holds, so no other
-- worker takes them over; and name those it no longer holds (another worker took them
-- while this one could not reach Redis for longer than a lease: that one runs them now,
-- and this one must stop, not claim them back and run them a second time beside it).
-- Called through `Renew` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 the queue's stream
-- ARGV: 1 the consumer group, 2 this worker (its consumer name), 3... entry ids
-- Returns the entry ids it no longer holds.
-- A call names at most `RENEW_BATCH` entries (jobs/queue.py): Redis runs nothing else
-- while it runs, and a worker holding 100,000 jobs renews them in many short calls.
-- min-idle-time 0: those it holds are this worker's own.
local lost, claim = {}, {KEYS[1], ARGV[1], ARGV[2], 0}
for i = 3, #ARGV do
  local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #held > 0 then claim[#claim + 1] = ARGV[i] else lost[#lost + 1] = ARGV[i] end
end
if #claim > 4 then
  claim[#claim + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(claim))
end
return lost
