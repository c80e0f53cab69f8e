-- auth: the account behind a key, its limits and the per-minute window's use for the
-- X-RateLimit-* headers, in one round trip. Reads also count against their own,
-- more generous fixed-window limit.
-- Only a request with the key's own secret (ARGV[3]: its SHA-256) on a key that is not
-- revoked (or a live token's own) counts a read: someone who knows just the account id cannot use up its reads.
-- (The caller still decides with a constant-time comparison; this only gates counting.)
-- The limits are read as admit.lua reads them (the plan table ARGV[4] and the key's own
-- overrides: limits.lua).
-- A client token (ARGV 5 = '1') is read too (KEYS 4) and returned for the caller to
-- check; it counts a read when its own secret is given on a live token of the key.
-- Each token counts its reads apart (KEYS 3 is its own counter); a read its own limit
-- allows counts again in KEYS 5, the reads of all the key's tokens together, whose
-- ceiling the caller applies (so a token past its own limit uses up no one else's).
-- A read limit is ARGV 7 (GATEWAY_READ_RPM), or the key's own rpm when higher, or ARGV 8
-- (GATEWAY_READ_RPM_PER_JOB) times the jobs it may run at once when that is higher.
-- A poll gives a job record (KEYS 6, of the same account: the same slot) to read with
-- the key check, in the same round trip; it is read only for the key's own secret on a
-- live key or token (the caller still decides, as above) and as read.lua reads it.
-- Called through `Auth` in scripts.py, which names each key and argument and decodes
-- the reply.
-- KEYS: 1 account, 2 rate, 3 reads, 4 client token (unused for a key), 5 the reads of all
--       the key's tokens (unused for a key), 6 optional: a job record to read
-- ARGV: 1 now_ms, 2 count_read (0/1), 3 secret hash, 4 plan table, 5 client token (0/1),
--       6 how long a minute's read counter is kept (ms), 7 read rpm, 8 read rpm per job
-- Returns {flat account hash, window used, window reset (unix s), reads, rpm, concurrency,
--          daily, flat token hash ({} for a key), read limit, the tokens' reads (0 when
--          not counted), and with KEYS 6 the record as read.lua returns it ({} when gone
--          or not read)}; {{}} for an unknown account.
-- include: limits.lua
-- include: record.lua
-- include: read_record.lua
local acct = redis.call('HGETALL', KEYS[1])
if #acct == 0 then return {acct} end
local now = tonumber(ARGV[1])
local fields = {}
for i = 1, #acct, 2 do fields[acct[i]] = acct[i + 1] end
local rpm, conc, daily = key_limits(ARGV[4], fields['plan'] or '', fields['rpm'],
  fields['concurrency'], fields['daily'])
local used = window_used(KEYS[2], now)
local token = {}
local own = fields['key_hash'] == ARGV[3]
if ARGV[5] == '1' then
  token = redis.call('HGETALL', KEYS[4])
  local t = {}
  for i = 1, #token, 2 do t[token[i]] = token[i + 1] end
  own = t['hash'] == ARGV[3] and t['key_hash'] == fields['key_hash'] and t['revoked'] ~= '1'
    and tonumber(t['expires'] or '0') > now
end
local read_limit = math.max(tonumber(ARGV[7]), tonumber(fields['rpm'] or '') or -1,
  tonumber(ARGV[8]) * math.max(conc, 0))
local reads, tokens_reads = 0, 0
if ARGV[2] == '1' and own and fields['revoked'] ~= '1' then
  reads = redis.call('INCR', KEYS[3])
  if reads == 1 then redis.call('PEXPIRE', KEYS[3], ARGV[6]) end
  if ARGV[5] == '1' and reads <= read_limit then
    tokens_reads = redis.call('INCR', KEYS[5])
    if tokens_reads == 1 then redis.call('PEXPIRE', KEYS[5], ARGV[6]) end
  end
end
local out = {acct, used, window_reset(KEYS[2], now), reads, rpm, conc, daily, token,
  read_limit, tokens_reads}
if KEYS[6] then
  out[11] = (own and fields['revoked'] ~= '1') and read_record(KEYS[6]) or {}
end
return out
