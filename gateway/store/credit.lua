-- credit: a top-up (or a negative correction) recorded in the ledger, applied once.
-- KEYS: 1 account, 2 ledger, 3 this top-up's own key   ARGV: 1 delta, 2 reason
-- Returns the new balance, or {err} when the account is unknown or would go negative.
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('unknown account') end
-- The top-up's key exists once it was applied: this is the same top-up sent again
-- (redis-py re-sends a command when the connection drops before its reply). Once only.
if redis.call('EXISTS', KEYS[3]) == 1 then
  return tonumber(redis.call('HGET', KEYS[1], 'credits') or '0')
end
local balance = tonumber(redis.call('HGET', KEYS[1], 'credits') or '0')
local delta = tonumber(ARGV[1])
if balance + delta < 0 then return redis.error_reply('balance would go below zero') end
balance = redis.call('HINCRBY', KEYS[1], 'credits', delta)
redis.call('XADD', KEYS[2], '*', 'delta', delta, 'reason', ARGV[2], 'job', '',
  'balance', balance)
redis.call('SET', KEYS[3], '1', 'PX', 86400000)
return balance
