-- ledger: one entry of an account's credit ledger (a stream: ids are ms timestamps).
-- With `keep` > 0 each entry trims those older than `keep` ms (MINID ~: by whole stream
-- nodes, so cheap); 0 keeps all. The balance is the account's `credits`, never the
-- ledger's sum: trimming changes no balance.
-- Included by admit.lua, credit.lua, finish.lua and promote.lua.
local function ledger_add(key, now, keep, delta, reason, job, balance)
  if keep > 0 then
    redis.call('XADD', key, 'MINID', '~', now - keep, '*', 'delta', delta, 'reason', reason,
      'job', job, 'balance', balance)
  else
    redis.call('XADD', key, '*', 'delta', delta, 'reason', reason, 'job', job,
      'balance', balance)
  end
end
