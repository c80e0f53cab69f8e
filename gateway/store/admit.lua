-- admit: the one gate every generation request passes, in a single atomic step.
-- Either every limit is checked and taken together (rate window, day, concurrency
-- slot, credits) and the job is recorded and queued, or nothing changes at all.
--
-- The per-minute limit is a sliding log (a sorted set of admission times), not GCRA:
-- docs/api.md#limits promises at most N in ANY 60-second window, which a sliding log states
-- exactly; GCRA with burst N can admit almost 2N in one window. N is small (<= plan rpm).
--
-- A cacheable request (ARGV 9 = '1') is decided here too, in the same round trip:
--   hit     the result cache holds it: a new job, completed at once, cost 0, no slot
--           (its webhook, if it has one, scheduled at once); its record refers to the
--           cache entry rather than copying the outcome (read.lua reads both);
--   follow  an identical job is in flight: a new job that waits for it (cost 0, not
--           queued, but a concurrency slot: it has not ended); the leader's worker
--           completes it and gives the slot back (settle.lua);
--   run     otherwise, an ordinary job, which becomes the in-flight leader.
-- Hits and followers count against the minute and day limits like any request.
--
-- The key is checked here too (so a generation request costs one round trip, not two):
-- ARGV 2 is the SHA-256 of the secret the caller sent, compared with the stored one in
-- constant time (see `same` below). Its limits are read as auth.lua reads them (the
-- plan table ARGV 3 and the key's own overrides: limits.lua).
--
-- A client token (ARGV 11 = '1'; docs/api.md#client-tokens) is checked instead of the
-- key: its own secret, not expired nor revoked, minted by the account's current key on
-- an account not revoked. Its origins, services and job cap are checked here, and its
-- budget with the account's credits: both are charged together, so concurrent requests
-- can never spend more than the budget, in any number of processes.
--
-- Called through `Admit` in scripts.py, which names each key and argument below and
-- decodes the reply.
-- KEYS: 1 account, 2 rate, 3 day, 4 running, 5 ledger, 6 job, 7 jobs, 8 idem, 9 queue,
--       10 cache entry, 11 in-flight leader, 12 followers, 13 set of waited-on leaders,
--       14 client token, 15 the token's jobs (both unused for a key), 16 webhook schedule
-- ARGV: 1 now_ms, 2 secret hash, 3 plan table, 4 cost, 5 job_id, 6 lease_ms,
--       7 ms_to_day_end, 8 idem_hash ('' = none), 9 cacheable (0/1), 10 retention_ms,
--       11 client token (0/1), 12 the request's Origin ('' = none), 13 the service or
--       backend asked for, 14 ledger_keep_ms (ledger entries older are trimmed; 0 =
--       keep all), 15 and 16 the job record (record.lua) in two JSON objects: its
--       status, params and cost, and its other fields; 17 whether the job has a
--       webhook (0/1), 18 whether KEYS[8] is only looked up (0/1): it holds the id of
--       the job a waiting client left (`keys.left`, named by the request's
--       fingerprint), which this request, sent again, joins (the caller uses it up once
--       it has read that job; never written here)
-- Returns {verdict, rpm, concurrency, daily, window used, window reset (unix s), balance,
--          plan, ...}: 'ok' adds mode and a hit's outcome; 'limited' which and wait_ms;
--          'credits' cost; 'duplicate' the earlier job id (of the idempotency key, of
--          the job a client left (ARGV 18), or this job's own when it was admitted
--          already); 'forbidden' (a token's rule)
--          origin, service or jobs; 'unauthenticated' nothing. For a token, balance is
--          what is left of its budget (never the account's credits: its page's to see).
-- include: limits.lua
-- include: record.lua
-- include: ledger.lua
local now = tonumber(ARGV[1])
local cost, job_id = tonumber(ARGV[4]), ARGV[5]
local lease, day_left = tonumber(ARGV[6]), tonumber(ARGV[7])
local idem_hash, cacheable, retention = ARGV[8], ARGV[9] == '1', tonumber(ARGV[10])
local idem_only = ARGV[18] == '1'
local price = cost

local acct = redis.call('HMGET', KEYS[1], 'credits', 'revoked', 'key_hash', 'plan', 'rpm',
  'concurrency', 'daily')
-- The hashes are compared as SHA-1 digests of both (redis.sha1hex, in C): comparing the
-- digests takes as long however much of the stored hash the given one matches. (A byte
-- loop in Lua cost ~15% of this script.) The embedded store has no sha1hex: there, a
-- loop that looks at every byte whatever the first difference.
local function same(stored, given)
  if redis.sha1hex then return redis.sha1hex(stored) == redis.sha1hex(given) end
  local diff = 0
  if #stored ~= #given then diff, stored = 1, string.rep('0', #given) end
  for i = 1, #given do
    diff = diff + math.abs(string.byte(stored, i) - string.byte(given, i))
  end
  return diff == 0
end
local tok = nil
if ARGV[11] == '1' then
  tok = redis.call('HMGET', KEYS[14], 'hash', 'key_hash', 'expires', 'revoked',
    'max_credits', 'spent', 'max_jobs', 'jobs', 'origins', 'services')
  if not same(tok[1] or '', ARGV[2]) or tok[4] == '1' or tonumber(tok[3] or '0') <= now
    or tok[2] ~= acct[3] or not acct[1] or acct[2] == '1' then
    return {'unauthenticated'}
  end
elseif not same(acct[3] or '', ARGV[2]) or not acct[1] or acct[2] == '1' then
  return {'unauthenticated'}
end
local balance = tonumber(acct[1])
local left = nil  -- a token's budget not yet spent
if tok then left = tonumber(tok[5]) - tonumber(tok[6]) end
local shown = left or balance
local plan = acct[4] or ''
local rpm, conc, daily = key_limits(ARGV[3], plan, acct[5], acct[6], acct[7])

local used = window_used(KEYS[2], now)
local function reply(verdict, window, ...)
  return {verdict, rpm, conc, daily, window, window_reset(KEYS[2], now), shown, plan,
    ...}
end

-- A job id is new to every request: finding its job means this very admission ran
-- already and its reply was lost (redis-py sends a command again when the connection
-- drops under it). Answer with that job; take nothing twice.
if redis.call('EXISTS', KEYS[6]) == 1 then return reply('duplicate', used, job_id) end

if idem_hash ~= '' then
  local prior = redis.call('GET', KEYS[8])
  if prior and idem_only then return reply('duplicate', used, prior) end
  if prior then
    local sep = string.find(prior, '|', 1, true)
    if string.sub(prior, sep + 1) == idem_hash then
      return reply('duplicate', used, string.sub(prior, 1, sep - 1))
    end
    return reply('idempotency_mismatch', used)
  end
end

-- A token's own rules (lists are stored as ',a,b,'; '' = any).
if tok then
  local origin, service = ',' .. ARGV[12] .. ',', ',' .. ARGV[13] .. ','
  if tok[9] ~= '' and (ARGV[12] == '' or not string.find(tok[9], origin, 1, true)) then
    return reply('forbidden', used, 'origin')
  end
  if tok[10] ~= '' and not string.find(tok[10], service, 1, true) then
    return reply('forbidden', used, 'service')
  end
  if tonumber(tok[7]) >= 0 and tonumber(tok[8]) >= tonumber(tok[7]) then
    return reply('forbidden', used, 'jobs')
  end
end

if rpm >= 0 and used >= rpm then
  -- Room comes when the window holds rpm - 1: when its (used - rpm + 1)th oldest leaves
  -- (the oldest itself, unless the key's limit was lowered with more than that in it).
  local nth = redis.call('ZRANGE', KEYS[2], used - rpm, used - rpm, 'WITHSCORES')
  local wait = 1000
  if nth[2] then wait = tonumber(nth[2]) + 60000 - now end
  return reply('limited', used, 'minute', wait)
end

local today = tonumber(redis.call('GET', KEYS[3]) or '0')
if daily >= 0 and today >= daily then
  return reply('limited', used, 'day', day_left)
end

-- A job that runs is queued and holds a concurrency slot; a follower holds a slot too
-- (concurrent = jobs not yet ended: docs/api.md#limits), a hit none. Neither costs
-- anything (`price` is what it would have cost).
local mode = 'run'
local entry = nil
if cacheable then
  -- settle.lua writes every field of an entry at once, `hit_metadata` among them. The
  -- entry serves hits `until` its outputs' retention ends (a minute before: a hit's
  -- record lives only as long as the outputs it shows, below).
  entry = redis.call('HMGET', KEYS[10], 'urls', 'width', 'height', 'hit_metadata', 'until')
  if entry[1] and (not entry[5] or tonumber(entry[5]) > now + 60000) then
    mode = 'hit'
  else
    local leader = redis.call('GET', KEYS[11])
    if leader then
      local led = load_job(leader) or {}
      if led['status'] == 'queued' or led['status'] == 'processing' then
        mode = 'follow'
        -- This request sees it now, whoever else leaves it (`left_by_all`): it runs.
        if not led['followed'] then
          led['followed'] = 1
          save_job(leader, led)
        end
      end
    end
  end
  if mode ~= 'run' then cost = 0 end
end
local run = mode == 'run'
local slot = mode ~= 'hit'

if slot then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if conc >= 0 and redis.call('ZCARD', KEYS[4]) >= conc then
    local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    local wait = 1000
    if first[2] then wait = math.min(tonumber(first[2]) - now, 5000) end
    return reply('limited', used, 'concurrency', wait)
  end
end

if balance < cost or (left and left < cost) then
  return reply('credits', used, cost)
end

-- Everything is allowed: take it all.
redis.call('ZADD', KEYS[2], now, job_id)
redis.call('PEXPIRE', KEYS[2], 60000)
if redis.call('INCR', KEYS[3]) == 1 then  -- the day's first: it ends an hour after
  redis.call('PEXPIRE', KEYS[3], day_left + 3600000)
end
if slot then redis.call('ZADD', KEYS[4], now + lease, job_id) end
if cost > 0 then
  balance = redis.call('HINCRBY', KEYS[1], 'credits', -cost)
  ledger_add(KEYS[5], now, tonumber(ARGV[14]), -cost, 'charge', job_id, balance)
  shown = balance
end
if tok then
  shown = left - cost
  redis.call('HINCRBY', KEYS[14], 'spent', cost)
  redis.call('HINCRBY', KEYS[14], 'jobs', 1)
  redis.call('ZADD', KEYS[15], now, job_id)
  redis.call('PEXPIRE', KEYS[15], math.max(redis.call('PTTL', KEYS[14]), 1))
end
local outcome = {}
-- The record as the caller made it: its two halves, one object.
local function made()
  return string.sub(ARGV[15], 1, -2) .. ',' .. string.sub(ARGV[16], 2)
end
if mode == 'run' then
  redis.call('SET', KEYS[6], made())
  if cacheable then
    redis.call('SET', KEYS[11], KEYS[6], 'PX', retention)
    redis.call('HINCRBY', KEYS[1], 'cache_misses', 1)
  end
elseif mode == 'hit' then
  outcome = {entry[1], entry[2], entry[3], entry[4]}
  -- As long as the outputs it shows live (the entry's `until`; the sweep removes them an
  -- hour after), not a full retention from now: its URLs must never go dead before it.
  local left = entry[5] and tonumber(entry[5]) - now or retention
  local record
  if entry[5] then
    -- A hit's record refers to its cache entry (`hit` = the entry's generation, its
    -- `until`: entry_write.lua; and the digest, `cache_key`) instead of copying the
    -- outcome and the params: read.lua reads both. The record lives until the entry's
    -- `until`, when the outputs are swept; the entry, written to live a minute longer,
    -- outlives it.
    -- What is known otherwise is left out too (cost 0: the default; completed_at:
    -- created_at), so the record stays ~270 bytes. Its `price` (what it would have
    -- cost: a cacheable request's record holds it) stays. So the hit's record is the
    -- second half of the caller's (all but status, params and cost) behind its own
    -- status and `hit`, made without decoding the JSON.
    record = '{"status":"completed","hit":' .. entry[5] .. ',' .. string.sub(ARGV[16], 2)
  else  -- an entry written before entries held their params: copy, as hits once did
    local job = cjson.decode(made())
    job['status'], job['completed_at'], job['cost'] = 'completed', now, 0
    job['urls'], job['width'], job['height'] = cjson.decode(entry[1]),
      tonumber(entry[2]), tonumber(entry[3])
    job['metadata'] = entry[4]  -- JSON text, as record.lua keeps it
    record = cjson.encode(job)
  end
  redis.call('SET', KEYS[6], record, 'PX', math.max(left, 1))
  -- It ended here, not in finish.lua: its webhook (ARGV 17) is scheduled here, in the
  -- same step.
  if ARGV[17] == '1' then redis.call('ZADD', KEYS[16], 'NX', now, KEYS[6]) end
  redis.call('HINCRBY', KEYS[1], 'cache_hits', 1)
  redis.call('HINCRBY', KEYS[1], 'credits_saved', price)
else  -- follow
  local job = cjson.decode(made())
  job['cost'] = 0
  redis.call('SET', KEYS[6], cjson.encode(job))
  -- The waiters and the leader's key live as long as job records do, not just a job's
  -- deadline: a leader that ends at its deadline (or is started after it, its workers
  -- down meanwhile) must still find its waiters to release (cache.py).
  redis.call('RPUSH', KEYS[12], KEYS[6])
  redis.call('PEXPIRE', KEYS[12], retention)
  redis.call('SADD', KEYS[13], KEYS[11])  -- watched, should its leader's worker die
  redis.call('HINCRBY', KEYS[1], 'cache_coalesced', 1)
  redis.call('HINCRBY', KEYS[1], 'credits_saved', price)
end
redis.call('ZADD', KEYS[7], now, job_id)
-- The index lists the jobs whose records may still be read; it grew by every job the
-- account made, forever. An entry older than a record usually lives (a job ends within
-- its deadline, `lease`, and its record lives `retention` after; an hour's margin) is
-- dropped once its record is gone, up to 20 at one admission in four (those whose
-- random job id ends in 0, 4, 8 or d: the look is a call on every admission else), so
-- none waits long and none holds Redis (a job still queued after a long outage keeps
-- its record, and its entry). Its records' keys share this one's slot.
if string.byte(job_id, -1) % 4 == 0 then
  local prefix = string.sub(KEYS[6], 1, #KEYS[6] - #job_id)
  local stale = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf',
    now - (retention + lease + 3600000), 'LIMIT', 0, 20)
  for _, old in ipairs(stale) do
    if redis.call('EXISTS', prefix .. old) == 0 then redis.call('ZREM', KEYS[7], old) end
  end
end
if idem_hash ~= '' and not idem_only then
  redis.call('SET', KEYS[8], job_id .. '|' .. idem_hash, 'PX', 86400000)
end
if run then redis.call('XADD', KEYS[9], '*', 'job', KEYS[6]) end
return reply('ok', used + 1, mode, unpack(outcome))
