-- patch: set fields of a job record, and add 1 to one of them, in one step (the record
-- is one string: record.lua). Setting fields on a record that is gone sets nothing.
-- Runs inside once.lua (`job` loaded, `again`, `mark`): a count sent again, its reply
-- lost, adds nothing more (a webhook's attempt counted twice would end its retries one
-- attempt early).
-- Called through `Patch` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 job   ARGV: 1 JSON object: the fields to set (null: removed), 2 the field to add 1 to ('' none)
-- Returns that field's new value (0 when none was asked); -1 when the record is gone.
if not job then return -1 end
for name, value in pairs(cjson.decode(ARGV[1])) do set(job, name, value) end
local counted = 0
if ARGV[2] ~= '' then
  counted = tonumber(job[ARGV[2]] or '0')
  if not again then
    counted = counted + 1
    job[ARGV[2]] = counted
    mark()
  end
end
save_job(KEYS[1], job)
return counted
