-- auth: the account behind a key, and the per-minute window's use for the
-- X-RateLimit-* headers, in one round trip. Reads also count against their own,
-- more generous fixed-window limit.
-- KEYS: 1 account, 2 rate, 3 reads   ARGV: 1 now_ms, 2 count_read (0/1)
-- Returns {flat account hash, used, oldest_ms, reads}
local acct = redis.call('HGETALL', KEYS[1])
if #acct == 0 then return {acct, 0, 0, 0} end
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
local used = redis.call('ZCARD', KEYS[2])
local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local reads = 0
if ARGV[2] == '1' then
  reads = redis.call('INCR', KEYS[3])
  if reads == 1 then redis.call('PEXPIRE', KEYS[3], 61000) end
end
return {acct, used, oldest[2] or 0, reads}
