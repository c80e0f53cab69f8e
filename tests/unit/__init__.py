"""Fast tests: no server process and no network; each runs in milliseconds."""
