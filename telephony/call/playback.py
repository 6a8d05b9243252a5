"""Agent audio on its way to the caller: what Twilio still holds unplayed, and the paced sender.

Twilio plays what we send at 8,000 bytes per second and echoes each `mark` once the audio
before it has played, or at once when a `clear` empties its buffer. `PlaybackLedger` (pure)
turns that into "how much is still unplayed right now"; `Player` (one task per call) sends
agent audio only a short lead ahead of the caller's ear, so a barge-in has little to clear.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..twilio.media_stream import clear_message, mark_message, media_message

__all__ = ["Histogram", "PlaybackLedger", "Player"]

BYTES_PER_SECOND = 8000
MAX_MESSAGE_BYTES = 1600
"""Agent audio goes out in messages of at most 200 ms, so pacing stays fine-grained."""
MAX_QUEUED_BYTES = 120 * BYTES_PER_SECOND
"""Agent audio waiting to be sent beyond two minutes is dropped (newest first) and counted:
a model that far ahead of the caller is misbehaving, and memory must stay bounded."""

log = logging.getLogger(__name__)

GAP_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class Histogram:
    """Counts in Prometheus buckets: each call keeps its own, merged by the server at its end."""

    buckets: tuple[float, ...] = GAP_BUCKETS_S
    counts: list[int] = field(default_factory=lambda: [0] * (len(GAP_BUCKETS_S) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        seen = 0
        for bound, n in zip(self.buckets, self.counts, strict=False):
            seen += n
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {seen}')
        lines += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.total:.6f}",
            f"{name}_count {self.count}",
        ]
        return lines


class UnknownMark(ValueError):
    """Twilio echoed a mark we never sent (or echoed one twice)."""


class PlaybackLedger:
    """Accounting of agent audio between us and the caller's ear. Times are monotonic seconds."""

    def __init__(self) -> None:
        self.sent_bytes = 0
        self._playout_end = 0.0
        self._pending: dict[str, int] = {}
        self._cleared: set[str] = set()
        self.marks_sent = 0
        self.marks_played = 0
        self.marks_cleared = 0

    def sent(self, nbytes: int, now: float) -> None:
        self._playout_end = max(now, self._playout_end) + nbytes / BYTES_PER_SECOND
        self.sent_bytes += nbytes

    def mark_sent(self, name: str) -> None:
        self._pending[name] = self.sent_bytes
        self.marks_sent += 1

    def mark_echoed(self, name: str, now: float) -> bool:
        """True when the audio before the mark was heard, False when a clear discarded it."""
        if name in self._cleared:
            self._cleared.discard(name)
            self.marks_cleared += 1
            return False
        position = self._pending.pop(name, None)
        if position is None:
            raise UnknownMark(f"mark {name!r:.60} was not sent or was already echoed")
        self.marks_played += 1
        # The echo pins down Twilio's play position exactly: re-anchor the estimate on it.
        self._playout_end = now + (self.sent_bytes - position) / BYTES_PER_SECOND
        return True

    def cleared(self, now: float) -> None:
        self._cleared.update(self._pending)
        self._pending.clear()
        self._playout_end = now

    @property
    def playout_end(self) -> float:
        """When the audio sent so far will have finished playing (an estimate, re-anchored
        by each mark echo)."""
        return self._playout_end

    def unplayed_ms(self, now: float) -> float:
        return max(0.0, self._playout_end - now) * 1000

    @property
    def pending_marks(self) -> int:
        return len(self._pending) + len(self._cleared)


class Player:
    """Paces agent audio to Twilio and clears it on barge-in. Owns one task, `run()`.

    A message goes out whenever Twilio holds less than `lead_ms` unplayed, so it never holds
    more than the lead plus one message (200 ms)."""

    def __init__(self, *, lead_ms: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ledger = PlaybackLedger()
        self._lead = lead_ms / 1000
        self._clock = clock
        self._queue: deque[tuple[float, bytes]] = deque()
        """(when it was queued, mu-law) per message."""
        self._wake = asyncio.Event()
        self._sending = asyncio.Lock()
        """Keeps each media message and its mark together on the wire."""
        self._send: Callable[[str], Awaitable[None]] | None = None
        self._stream_sid = ""
        self._attached_at = 0.0
        self._mark_seq = 0
        self.gaps = Histogram()
        """Per message sent: silence the caller heard because it left late (0 when on time)."""
        self.dropped_bytes = 0
        """Unsent audio dropped by clears."""
        self.overflow_bytes = 0
        """Audio refused because the queue was full."""
        self._queued = 0
        self.clears = 0

    def attach(self, stream_sid: str, send: Callable[[str], Awaitable[None]]) -> None:
        """The media stream is up: audio queued before it (the greeting) can now flow."""
        self._stream_sid = stream_sid
        self._send = send
        self._attached_at = self._clock()
        self._wake.set()

    def enqueue(self, mulaw: bytes) -> None:
        room = MAX_QUEUED_BYTES - self._queued
        if len(mulaw) > room:
            if not self.overflow_bytes:
                log.warning("agent audio queue full (%d s): dropping", MAX_QUEUED_BYTES // 8000)
            self.overflow_bytes += len(mulaw) - max(0, room)
            mulaw = mulaw[: max(0, room)]
        now = self._clock()
        for i in range(0, len(mulaw), MAX_MESSAGE_BYTES):
            self._queue.append((now, mulaw[i : i + MAX_MESSAGE_BYTES]))
        self._queued += len(mulaw)
        self._wake.set()

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def busy(self) -> bool:
        """Agent audio is waiting to be sent or still playing at the caller's end."""
        return bool(self._queue) or self.ledger.unplayed_ms(self._clock()) > 0

    async def clear(self) -> bool:
        """Drop every unsent byte and empty Twilio's buffer; False when nothing was pending."""
        dropped = self.queued_bytes
        self._queue.clear()
        self._queued = 0
        self.dropped_bytes += dropped
        # After a media message already on its way, never before it: that one would play.
        async with self._sending:
            if self._send is None or self.ledger.unplayed_ms(self._clock()) <= 0:
                return dropped > 0
            self.ledger.cleared(self._clock())
            self.clears += 1
            await self._send(clear_message(self._stream_sid))
        return True

    def on_mark(self, name: str) -> bool:
        return self.ledger.mark_echoed(name, self._clock())

    def _due(self) -> float:
        """Seconds until the next message may go (<= 0: now); inf when there is nothing to send."""
        if not self._queue or self._send is None:
            return float("inf")
        return self.ledger.unplayed_ms(self._clock()) / 1000 - self._lead

    async def flush(self) -> None:
        """Sends every message that is due now. The pump calls it right after enqueueing, so
        agent audio leaves in the same step it arrived in rather than one loop turn later."""
        async with self._sending:
            while (send := self._send) is not None and self._due() < 0:
                queued_at, chunk = self._queue.popleft()
                self._queued -= len(chunk)
                self._mark_seq += 1
                name = str(self._mark_seq)
                now = self._clock()
                ready = max(self.ledger.playout_end, queued_at, self._attached_at)
                self.gaps.observe(max(0.0, now - ready))
                self.ledger.sent(len(chunk), now)
                self.ledger.mark_sent(name)
                await send(media_message(self._stream_sid, chunk))
                await send(mark_message(self._stream_sid, name))

    async def run(self) -> None:
        """Sends the rest as Twilio's buffer drains."""
        while True:
            await self.flush()
            due = self._due()
            self._wake.clear()
            if due == float("inf"):
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due + 0.001):
                        await self._wake.wait()
