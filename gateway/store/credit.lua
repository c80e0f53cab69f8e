-- credit: a top-up (or a negative correction) recorded in the ledger.
-- KEYS: 1 account, 2 ledger   ARGV: 1 delta, 2 reason
-- Returns the new balance, or {err} when the account is unknown or would go negative.
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('unknown account') end
local balance = tonumber(redis.call('HGET', KEYS[1], 'credits') or '0')
local delta = tonumber(ARGV[1])
if balance + delta < 0 then return redis.error_reply('balance would go below zero') end
balance = redis.call('HINCRBY', KEYS[1], 'credits', delta)
redis.call('XADD', KEYS[2], '*', 'delta', delta, 'reason', ARGV[2], 'job', '',
  'balance', balance)
return balance
