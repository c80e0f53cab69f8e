-- credit: a top-up (or a negative correction) recorded in the ledger, applied once.
-- Called through `Credit` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 account, 2 ledger, 3 this top-up's own key
-- ARGV: 1 delta, 2 reason, 3 now_ms, 4 ledger_keep_ms (0 = keep all), 5 the largest
--       balance allowed
-- Returns {'ok', balance}; {'unknown', 0} when the account is unknown, {'negative',
-- balance} when it would go below zero, {'too_large', balance} above the largest
-- (then nothing changes).
-- include: ledger.lua
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown', 0} end
-- The top-up's key exists once it was applied: this is the same top-up sent again
-- (redis-py re-sends a command when the connection drops before its reply). Once only.
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {'ok', tonumber(redis.call('HGET', KEYS[1], 'credits') or '0')}
end
local balance = tonumber(redis.call('HGET', KEYS[1], 'credits') or '0')
local delta = tonumber(ARGV[1])
if balance + delta < 0 then return {'negative', balance} end
if balance + delta > tonumber(ARGV[5]) then return {'too_large', balance} end
balance = redis.call('HINCRBY', KEYS[1], 'credits', delta)
ledger_add(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4] or '0'), delta, ARGV[2], '', balance)
redis.call('SET', KEYS[3], '1', 'PX', 86400000)
return {'ok', balance}
