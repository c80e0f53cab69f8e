-- auth: the account behind a key, and the per-minute window's use for the
-- X-RateLimit-* headers, in one round trip. Reads also count against their own,
-- more generous fixed-window limit.
-- Only a request with the key's own secret (ARGV[3]: its SHA-256) on a key that is not
-- revoked counts a read: someone who knows just the account id cannot use up its reads.
-- (The caller still decides with a constant-time comparison; this only gates counting.)
-- KEYS: 1 account, 2 rate, 3 reads   ARGV: 1 now_ms, 2 count_read (0/1), 3 secret hash
-- Returns {flat account hash, used, oldest_ms, reads}
local acct = redis.call('HGETALL', KEYS[1])
if #acct == 0 then return {acct, 0, 0, 0} end
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
local used = redis.call('ZCARD', KEYS[2])
local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local reads = 0
if ARGV[2] == '1' then
  local owner = redis.call('HMGET', KEYS[1], 'key_hash', 'revoked')
  if owner[1] == ARGV[3] and owner[2] ~= '1' then
    reads = redis.call('INCR', KEYS[3])
    if reads == 1 then redis.call('PEXPIRE', KEYS[3], 61000) end
  end
end
return {acct, used, oldest[2] or 0, reads}
