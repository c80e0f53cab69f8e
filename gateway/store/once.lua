-- once: wrapped around each script that changes one job record (KEYS[1]) so that the
-- same call sent twice changes it once. redis-py sends a command again when the
-- connection drops before its reply: the script ran, its reply was lost, and a plain
-- script would run again (a second attempt counted, a second charge, an end that reads
-- as "someone else ended it").
-- The caller's last argument is a token new to every call (`Script` adds it; the script
-- below does not see it in ARGV). The record is loaded here as `job` (nil: missing); a
-- script calls `mark()` where it changes the record, which keeps the token in it (saved
-- with it: save_job), so run again with its own token found, `again` is true and the
-- script must change nothing and answer as the first run did.
-- include: record.lua
local token = table.remove(ARGV)
local job = load_job(KEYS[1])
local again = job ~= nil and job['op'] == token
local function mark() job['op'] = token end
return (function()
-- BODY
end)()
