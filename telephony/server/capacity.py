"""Admission control: how loaded this process is, so a new call can be turned away politely
instead of degrading every call in progress.

All calls share one event loop, and two things show it is full. Its lag (how late a short
sleep wakes up) grows when the process cannot get a core. Its busy share (CPU time of the
loop's thread per second of loop time) nears 1 when the loop has work every moment: the lag
stays small then, because each callback is short, but every call's work queues behind every
other call's, and answers come seconds late (measured with `bench/load.py`). Both are
measured against the loop's own clock, so a virtual-time loop (which skips idle time) never
looks busy.

Both signals follow a burst of calls too late: a new call costs little until its stream flows
and its caller talks, and the smoothing takes seconds more. 200 calls arriving within 4 s were
nearly all admitted before either signal moved (171 of them on the bench; 3 were served
well). So `Admission` also counts calls: each call, settled or just admitted, is charged the
per-call cost learnt from the calls that have settled, and a call that would take the total
past the busy budget is turned away at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

__all__ = ["Admission", "LoopMonitor"]

SMOOTHING = 0.05
"""Weight of the newest sample in the running estimates (about two seconds of memory): a
burst of calls being set up at once loads the loop for a moment, saturation for good."""
SETTLE_S = 5.0
"""A new call shows its cost in the busy share this long after it was admitted: Twilio opens
the stream a second or two after the webhook, then the greeting plays and the caller talks.
Until then it is charged the learnt cost but not learnt from."""
RISE = 0.05
"""Weight of one sample (one per monitor interval) in the learnt per-call cost when it is above
it, with the process full of settled calls (about two seconds of memory)."""
FALL = 0.005
"""The same when the sample is below the cost: ten times slower. A call costs most while its
caller talks and its answer plays, and calls that arrived together talk together: a lull, or
calls not yet talking, must not make room for calls that will."""


class Admission:
    """Whether one more call fits in the loop's busy budget: every call in progress, settled or
    starting, is charged the learnt per-call cost. Pure (the caller passes the clock's reading
    and the number of calls), so it is tested with values in and out."""

    def __init__(self, budget: float, prior_cost: float) -> None:
        self.budget = budget
        """Share of the loop's time calls may take (0: no limit)."""
        self.cost = prior_cost
        """Share of the loop one call takes: the prior until calls have settled, then learnt."""
        self._full = budget / prior_cost
        """Calls that fill the budget at the prior cost: samples weigh by how near to it the
        settled calls are."""
        self._admitted: deque[float] = deque()
        # The busy share and the number of calls, smoothed alike, so that their ratio stays
        # true while calls come and go.
        self._busy = 0.0
        self._calls = 0.0

    @property
    def capacity(self) -> float:
        """Calls the budget holds at the learnt cost."""
        return self.budget / self.cost

    def starting(self, now: float) -> int:
        """Calls admitted within the last SETTLE_S (some may have ended since: they are still
        charged, which errs towards turning a call away)."""
        while self._admitted and now - self._admitted[0] >= SETTLE_S:
            self._admitted.popleft()
        return len(self._admitted)

    def admit(self, now: float) -> None:
        self._admitted.append(now)

    def learn(self, busy: float, calls: int, now: float) -> None:
        """One sample of the loop's busy share while `calls` are in progress. A sample weighs
        by the square of the share of a full process that settled calls make up: calls still
        starting teach nothing (a burst of them is charged the cost learnt before it); with
        few calls, other work on the loop (a call being set up, a garbage collection) is much
        of a per-call sample, and the cost matters little while the process is far from full.
        A second of a saturated loop with one call on moves the capacity by one call."""
        self._busy += SMOOTHING * (busy - self._busy)
        self._calls += SMOOTHING * (calls - self._calls)
        settled = calls - min(calls, self.starting(now))
        if not self.budget or not settled:
            return
        sample = self._busy / self._calls
        rate = RISE if sample > self.cost else FALL
        self.cost += rate * (settled / max(calls, self._full)) ** 2 * (sample - self.cost)

    def refusal(self, calls: int, now: float) -> str | None:
        """Why one more call would not fit, if it would not."""
        if not self.budget or (calls + 1) * self.cost <= self.budget:
            return None
        return (
            f"at capacity ({calls} calls, {self.starting(now)} of them starting, "
            f"each about {self.cost:.1%} of the event loop)"
        )


class LoopMonitor:
    def __init__(
        self, interval_s: float = 0.1, on_sample: Callable[[float, float], None] | None = None
    ) -> None:
        self._interval = interval_s
        self._on_sample = on_sample
        """Called with each interval's busy share and the loop's time at its end."""
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
            if self._on_sample is not None:
                self._on_sample(busy, loop.time())
