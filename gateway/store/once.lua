-- once: wrapped around each script that changes one job record (KEYS[1]) so that the
-- same call sent twice changes it once. redis-py sends a command again when the
-- connection drops before its reply: the script ran, its reply was lost, and a plain
-- script would run again (a second attempt counted, a second charge, an end that reads
-- as "someone else ended it").
-- The caller's last argument is a token new to every call (`Script` adds it; the script
-- below does not see it in ARGV). A script calls `mark()` where it changes the record,
-- which keeps the token there; run again with its own token found, `again` is true and
-- the script must change nothing and answer as the first run did.
local token = table.remove(ARGV)
local again = redis.call('HGET', KEYS[1], 'op') == token
local function mark() redis.call('HSET', KEYS[1], 'op', token) end
return (function()
-- BODY
end)()
