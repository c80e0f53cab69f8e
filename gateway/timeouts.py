"""Waiting with a time limit as the gateway does it: with `asyncio.timeout`, never
`asyncio.wait_for`, which on Python 3.11 drops a cancellation that arrives in the same
turn as the result (fixed in 3.12; `tests/test_durability.py` has the case)."""

from __future__ import annotations

import asyncio
import contextlib


async def set_within(event: asyncio.Event, seconds: float) -> None:
    """Wait for `event` at most `seconds`."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
