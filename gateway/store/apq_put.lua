-- apq_put: store a persisted query's document (Apollo's APQ) under its SHA-256, then
-- evict the least recently used documents while there are more than the limit.
-- Called through `ApqPut` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 documents (hash: sha -> document), 2 used (sorted set: sha -> ms)
-- ARGV: 1 sha, 2 document, 3 now_ms, 4 max_documents
-- Returns the number of documents evicted.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over <= 0 then return 0 end
local evicted = redis.call('ZPOPMIN', KEYS[2], over)
for i = 1, #evicted, 2 do redis.call('HDEL', KEYS[1], evicted[i]) end
return over
