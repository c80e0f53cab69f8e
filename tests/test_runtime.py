"""Start-up and shut-down of the parts a process owns (`gateway/runtime.py`).

A start-up that fails part way must raise the error that stopped it, and close what it
had opened already: here the Redis is one whose `SCRIPT` command is disabled (as some
managed Redis services do), so loading the Lua scripts fails after the clients are open.
"""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import ResponseError

from gateway.config import load_settings
from gateway.runtime import runtime
from tests.conftest import RedisServer


@pytest.fixture
def redis_without_scripts(tmp_path: Path) -> Iterator[int]:
    """A plain redis-server whose SCRIPT command is renamed away; its port."""
    server = RedisServer(tmp_path, cluster=False, args=("--rename-command", "SCRIPT", ""))
    server.start()
    try:
        yield server.port
    finally:
        server.stop()


def other_clients(watcher: redis.Redis) -> list[str]:
    mine = str(watcher.client_id())
    return [f"{c['addr']} ({c['cmd']})" for c in watcher.client_list() if c["id"] != mine]


async def test_start_up_failing_at_the_scripts_raises_that_error_and_closes_the_clients(
    redis_without_scripts: int, storage_dir: Path
) -> None:
    settings = load_settings(
        redis_url=f"redis://127.0.0.1:{redis_without_scripts}/0", storage_dir=storage_dir
    )
    gc.collect()  # what earlier tests left behind says so now, not inside the record below
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ResponseError, match=r"(?i)unknown command 'script'"):
            async with runtime(settings):
                pytest.fail("the runtime started without its scripts")
        gc.collect()  # an unclosed client would say so when collected
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []

    # Every connection the runtime opened is closed: the server sees only this one (its
    # side of a close may lag the client's by a moment, hence the wait for the condition).
    watcher = redis.Redis(port=redis_without_scripts, decode_responses=True)
    try:
        deadline = time.monotonic() + 5
        while other_clients(watcher) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert other_clients(watcher) == []
    finally:
        watcher.close()
