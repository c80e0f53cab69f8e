-- mint: a new client token of an account, unless the account holds `cap` live ones
-- already (each mint writes a record that lives up to a day: with no bound, one key
-- could fill Redis, which runs with noeviction). The live ones are a sorted set of
-- token ids by expiry, pruned here. The record is bound to the account's key as it is
-- now: a revoked key ends it.
-- Called through `Mint` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 account, 2 token record, 3 the account's live tokens
-- ARGV: 1 now_ms, 2 token_id, 3 expires_ms, 4 keep_ms (the record's life), 5 cap,
--       6 secret_hash, 7 max_credits, 8 max_jobs, 9 origins, 10 services, 11 the key
--       hash the request was checked with
-- Returns: {1, 0} minted, {0, when the soonest of the live ones expires (ms)}, or
-- {-1, 0}: the account's key is no longer that one (replaced since: `keys rotate`).
local now = tonumber(ARGV[1])
local key_hash = redis.call('HGET', KEYS[1], 'key_hash') or ''
if key_hash ~= ARGV[11] then return {-1, 0} end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then
  local soonest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  return {0, tonumber(soonest[2])}
end
redis.call('HSET', KEYS[2], 'hash', ARGV[6],
  'key_hash', key_hash, 'expires', ARGV[3],
  'revoked', '0', 'max_credits', ARGV[7], 'spent', 0, 'max_jobs', ARGV[8], 'jobs', 0,
  'origins', ARGV[9], 'services', ARGV[10])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[4]) then
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
end
return {1, 0}
