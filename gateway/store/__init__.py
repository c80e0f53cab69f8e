"""Redis: the keyspace, the connection, and the Lua scripts that change state atomically."""
