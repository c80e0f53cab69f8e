-- apq_get: a persisted query's document by its SHA-256, marked as used now (so the
-- least recently used are the ones `apq_put` evicts); false when it is not stored.
-- Called through `ApqGet` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 documents (hash: sha -> document), 2 used (sorted set: sha -> ms)
-- ARGV: 1 sha, 2 now_ms
-- Returns the document, or false (nil to the client).
local document = redis.call('HGET', KEYS[1], ARGV[1])
if document then redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1]) end
return document
