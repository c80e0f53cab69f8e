-- claim: take up to N due webhook deliveries and push each one's time out by a lease,
-- so a deliverer that dies leaves them to be taken again once the lease passes.
-- Called through `Claim` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 schedule   ARGV: 1 now_ms, 2 lease_ms, 3 count
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], until_ms, member) end
return due
