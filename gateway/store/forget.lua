-- forget: delete the stream group's consumers that hold no entry and have not read for
-- a while (the processes gone: each worker reads under a name of its own), which the
-- group would otherwise keep for ever. One script: no entry can be handed to a consumer
-- between the look and the delete, so none is ever dropped from the pending ones.
-- Called through `Forget` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 stream   ARGV: 1 group, 2 idle_ms (at least), 3 keep (the caller's own name)
-- Returns: how many consumers were deleted
local deleted = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local field = {}
  for i = 1, #consumer, 2 do field[consumer[i]] = consumer[i + 1] end
  if field['pending'] == 0 and field['idle'] >= tonumber(ARGV[2]) and field['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], field['name'])
    deleted = deleted + 1
  end
end
return deleted
