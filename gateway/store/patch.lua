-- patch: set fields of a job record, and add 1 to one of them, in one step (the record
-- is one string: record.lua). Setting fields on a record that is gone sets nothing.
-- A count carries a token of its own call, kept beside the field (`<field>_op`): the
-- call sent again, its reply lost, adds nothing more (a webhook's attempt counted twice
-- would end its retries one attempt early). Not once.lua's `op`: that is the token of
-- the job's last start, end or promotion, which must still know itself when sent again.
-- Called through `Patch` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 job   ARGV: 1 JSON object: the fields to set (null: removed), 2 the field to add 1 to ('' none),
--       3 the count's token
-- Returns that field's new value (0 when none was asked); -1 when the record is gone.
-- include: record.lua
local job = load_job(KEYS[1])
if not job then return -1 end
for name, value in pairs(cjson.decode(ARGV[1])) do set(job, name, value) end
local counted = 0
if ARGV[2] ~= '' then
  local op = ARGV[2] .. '_op'
  counted = tonumber(job[ARGV[2]] or '0')
  if job[op] ~= ARGV[3] then
    counted = counted + 1
    job[ARGV[2]], job[op] = counted, ARGV[3]
  end
end
save_job(KEYS[1], job)
return counted
