-- vacate: no waiter is left to run in the released leader's place: the identical
-- requests' in-flight key goes, and so does its entry in the shard's set of waited-on
-- leaders, but only while it still names that leader (a release, or the rescue of
-- another process, may have promoted a waiter meanwhile: it is the leader now).
-- Called through `Vacate` in scripts.py (named keys and arguments, a typed reply).
-- KEYS: 1 in-flight leader, 2 the shard's set of waited-on leaders (coalescing)
-- ARGV: 1 the leader released (its job key; '' when none was in flight)
-- Returns 1 when it vacated them, 0 when another leader holds them.
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], KEYS[1])
return 1
