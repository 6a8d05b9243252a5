"""Admission control: how loaded this process is, so a new call can be turned away politely
instead of degrading every call in progress.

All calls share one event loop, and two things show it is full. Its lag (how late a short
sleep wakes up) grows when the process cannot get a core. Its busy share (CPU time of the
loop's thread per second of loop time) nears 1 when the loop has work every moment: the lag
stays small then, because each callback is short, but every call's work queues behind every
other call's, and answers come seconds late (measured with `bench/load.py`). Both are
measured against the loop's own clock, so a virtual-time loop (which skips idle time) never
looks busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

__all__ = ["LoopMonitor"]

SMOOTHING = 0.05
"""Weight of the newest sample in the running estimates (about two seconds of memory): a
burst of calls being set up at once loads the loop for a moment, saturation for good."""


class LoopMonitor:
    def __init__(self, interval_s: float = 0.1) -> None:
        self._interval = interval_s
        self.lag_ms = 0.0
        """Smoothed lag of the event loop, in milliseconds."""
        self.busy = 0.0
        """Smoothed share of the time the loop's thread spends computing (0-1)."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="loop-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started, cpu = loop.time(), time.thread_time()
            await asyncio.sleep(self._interval)
            elapsed = loop.time() - started
            late_ms = max(0.0, elapsed - self._interval) * 1000
            self.lag_ms += SMOOTHING * (late_ms - self.lag_ms)
            busy = min(1.0, (time.thread_time() - cpu) / elapsed) if elapsed > 0 else 0.0
            self.busy += SMOOTHING * (busy - self.busy)
