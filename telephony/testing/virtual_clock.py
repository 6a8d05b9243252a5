"""An asyncio event loop on virtual time, so replayed calls run deterministically and fast.

Whenever nothing is ready to run, the loop jumps its clock to the next timer instead of
sleeping. Everything driven by `asyncio.sleep`, timeouts and `loop.time()` (the bridge, the
player, the simulated model, the Twilio-side simulator) then sees exactly the timing it
would see in real time, minus the waiting. Real I/O still works, but work done in threads
is invisible to the clock: keep such agents (and SQLite sessions) to real-time runs.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["VirtualTimeLoop", "run_virtual"]

T = TypeVar("T")


class _FastForwardSelector(selectors.DefaultSelector):
    """Polls for real I/O without blocking; when there is none, advances the loop's clock by
    the wait asyncio asked for (the time to its next timer)."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # no timers: only real I/O can wake us
            return super().select(None)
        self._loop.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._virtual_now = 0.0
        super().__init__(_FastForwardSelector(self))

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        self._virtual_now += seconds


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on a fresh virtual-time loop."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)
