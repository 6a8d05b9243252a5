"""Admission control: how loaded this process is, so a new call can be turned away politely
instead of degrading every call in progress.

All calls share one event loop; when it is saturated, every call's audio comes late. The
loop's lag (how late a short sleep wakes up) measures exactly that, on any machine and for
any agent, which a fixed call count cannot.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["LoopLagMonitor"]

SMOOTHING = 0.05
"""Weight of the newest sample in the running lag estimate (about two seconds of memory): a
burst of calls being set up at once lags the loop for a moment, saturation lags it for good."""


class LoopLagMonitor:
    def __init__(self, interval_s: float = 0.1) -> None:
        self._interval = interval_s
        self.lag_ms = 0.0
        """Smoothed lag of the event loop, in milliseconds."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="loop-lag-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self._interval
            await asyncio.sleep(self._interval)
            late_ms = max(0.0, loop.time() - expected) * 1000
            self.lag_ms += SMOOTHING * (late_ms - self.lag_ms)
