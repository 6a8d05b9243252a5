"""Agent audio on its way to the caller: what Twilio still holds unplayed, and the paced sender.

Twilio plays what we send at 8,000 bytes per second and echoes each `mark` once the audio
before it has played, or at once when a `clear` empties its buffer. Every echo reaches us a
network round trip after Twilio played the audio, and audio we send reaches Twilio part of a
round trip later: `PlaybackLedger` (pure) learns that round trip from the echoes and turns them
into "when will the echo of everything sent so far be back"; `Player` (one task per call) sends
agent audio only a short lead ahead of the caller's ear, plus the round trip, so Twilio's buffer
does not run dry on a slow line and a barge-in still has little to clear.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import operator
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from ..audio import mulaw_decode
from ..twilio.media_stream import clear_message, mark_message, media_message

__all__ = ["Histogram", "PlaybackLedger", "Player", "RoundTrip"]

BYTES_PER_SECOND = 8000
MAX_MESSAGE_BYTES = 1600
"""Agent audio goes out in messages of at most 200 ms, so pacing stays fine-grained."""
_MULAW = np.frombuffer(mulaw_decode(bytes(range(256))), "<i2").astype(np.float64)
"""Every mu-law byte's sample value, to measure how loud sent audio is."""
ECHO_FRAME_BYTES = 160
"""Agent audio is measured 20 ms at a time, the frame in which caller audio is judged."""
ECHO_WINDOW_S = 0.5
"""How long after playing it the agent's voice may come back in the caller's audio: a
speakerphone's acoustic path plus the line's, which is added apart (the round trip)."""
MAX_QUEUED_BYTES = 120 * BYTES_PER_SECOND
"""Agent audio waiting to be sent beyond two minutes is dropped (newest first) and counted:
a model that far ahead of the caller is misbehaving, and memory must stay bounded."""
MAX_LEAD_S = 1.5
"""The round trip is added to the configured lead up to this total (a larger configured lead
stays as it is): on a very slow line Twilio then runs a little short rather than holding seconds
that a barge-in would have to clear."""
ROUND_TRIP_WINDOW_S = 20.0
"""How long a round-trip sample counts: a line that became slower is believed after this."""
MAX_PRIME_S = MAX_MESSAGE_BYTES / BYTES_PER_SECOND
"""The longest a reply's first message waits for more audio (see `Player`)."""

log = logging.getLogger(__name__)

GAP_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
RESPONSE_BUCKETS_S = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
"""Response latency includes the model's own end-of-speech wait (about 600 ms)."""
UNDERRUN_S = 0.02
"""Agent audio leaving this much (a frame) after the audio before it ran out is an underrun:
silence the caller hears mid-reply (`bench/load.py` counts the same at the caller's end)."""


@dataclass
class Histogram:
    """Counts in Prometheus buckets: each call keeps its own, which the server reads as the
    call runs (no client library on the audio path) and adds up once it ends."""

    buckets: tuple[float, ...] = GAP_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.total += other.total

    @property
    def count(self) -> int:
        return sum(self.counts)


class UnknownMark(ValueError):
    """Twilio echoed a mark we never sent (or echoed one twice)."""


class RoundTrip:
    """The line's round trip, from samples that can only overstate it: the smallest sample of the
    last `window_s` seconds (always counting the newest one), 0 before the first.

    Jitter, queueing, a late server and an underrun at Twilio's end all make a sample larger,
    never smaller, so the minimum is the line's own delay; the configured lead covers the
    jitter on top of it once audio flows, and `jitter_s` says how large that jitter is."""

    def __init__(self, window_s: float = ROUND_TRIP_WINDOW_S) -> None:
        self._window = window_s
        self._low: deque[tuple[float, float]] = deque()
        """(when, seconds), increasing in both: a sample is dropped once a smaller one came
        after it, as it can never be the minimum again."""
        self._high: deque[tuple[float, float]] = deque()
        """The same for the maximum: increasing in time, decreasing in seconds."""

    def observe(self, seconds: float, now: float) -> None:
        for samples, outlasts in ((self._low, operator.lt), (self._high, operator.gt)):
            while samples and not outlasts(samples[-1][1], seconds):
                samples.pop()
            samples.append((now, seconds))
            while samples[0][0] < now - self._window:
                samples.popleft()

    @property
    def seconds(self) -> float:
        return self._low[0][1] if self._low else 0.0

    @property
    def jitter_s(self) -> float:
        """How far the samples spread: the line's jitter, both ways together."""
        return self._high[0][1] - self._low[0][1] if self._low else 0.0


class PlaybackLedger:
    """Accounting of agent audio between us and the caller's ear. Times are monotonic seconds
    on our clock; Twilio's play position is only seen through mark echoes, a round trip late."""

    def __init__(self) -> None:
        self.sent_bytes = 0
        self._earliest_end = 0.0
        """When what was sent would finish playing if it reached Twilio the moment it left: the
        line can only make it later. Never re-anchored (but reset by a clear), so an echo's
        excess over it measures the round trip."""
        self._echo_end = 0.0
        """When the echo of the last audio sent is due."""
        self._pending: dict[str, tuple[int, float]] = {}
        """Per mark awaiting its echo: bytes sent before it, and `_earliest_end` then."""
        self._cleared: set[str] = set()
        self.round_trip = RoundTrip()
        self.marks_sent = 0
        self.marks_played = 0
        self.marks_cleared = 0

    def sent(self, nbytes: int, now: float) -> None:
        duration = nbytes / BYTES_PER_SECOND
        self._earliest_end = max(now, self._earliest_end) + duration
        self._echo_end = max(now + self.round_trip.seconds, self._echo_end) + duration
        self.sent_bytes += nbytes

    def mark_sent(self, name: str) -> None:
        self._pending[name] = (self.sent_bytes, self._earliest_end)
        self.marks_sent += 1

    def mark_echoed(self, name: str, now: float) -> bool:
        """True when the audio before the mark was heard, False when a clear discarded it."""
        if name in self._cleared:
            # Echoed by the clear, or played before it and echoed since: either way it says
            # nothing about the round trip, and nothing of what was sent before it still plays.
            self._cleared.discard(name)
            self.marks_cleared += 1
            return False
        pending = self._pending.pop(name, None)
        if pending is None:
            raise UnknownMark(f"mark {name!r:.60} was not sent or was already echoed")
        position, earliest_end = pending
        self.marks_played += 1
        self.round_trip.observe(max(0.0, now - earliest_end), now)
        # The echo pins down Twilio's play position: re-anchor on it. Audio sent since cannot
        # echo before the round trip allows, however early this echo came.
        self._echo_end = max(
            now + (self.sent_bytes - position) / BYTES_PER_SECOND,
            self._earliest_end + self.round_trip.seconds,
        )
        return True

    def cleared(self, now: float) -> None:
        self._cleared.update(self._pending)
        self._pending.clear()
        self._earliest_end = self._echo_end = now

    @property
    def send_by(self) -> float:
        """The last moment audio can leave and still reach Twilio before its buffer runs dry:
        a round trip before the last audio's echo is due, as both delays lie between the two."""
        return self._echo_end - self.round_trip.seconds

    def unplayed_ms(self, now: float) -> float:
        """Until the echo of everything sent is due: what Twilio holds, what is on its way
        there, and the echo's way back (an estimate, re-anchored by each mark echo)."""
        return max(0.0, self._echo_end - now) * 1000

    def holds_audio(self, now: float) -> bool:
        """The caller may not have heard all that was sent: until its mark echoes (or a clear
        empties Twilio), audio may still be playing, or not even have arrived there."""
        return bool(self._pending) or self.unplayed_ms(now) > 0

    @property
    def pending_marks(self) -> int:
        return len(self._pending) + len(self._cleared)


def _loudest_20ms(mulaw: bytes) -> float:
    """Mean square of the loudest 20 ms (a shorter last piece counts on its own)."""
    pcm = _MULAW[np.frombuffer(mulaw, np.uint8)]
    squares = pcm * pcm
    whole = len(pcm) - len(pcm) % ECHO_FRAME_BYTES
    loudest = squares[:whole].reshape(-1, ECHO_FRAME_BYTES).mean(axis=1).max() if whole else 0.0
    return float(max(loudest, squares[whole:].mean() if whole < len(pcm) else 0.0))


class Player:
    """Paces agent audio to Twilio and clears it on barge-in. Owns one task, `run()`.

    A message goes out whenever less than `lead_ms` plus the line's round trip is unplayed (see
    `PlaybackLedger.unplayed_ms`): the round trip covers the audio in flight and the echoes'
    delay, so what Twilio holds when a message arrives stays near `lead_ms` on any line, and a
    clear arriving there finds at most that plus one message (200 ms).

    Twilio plays a message as soon as it arrives when its buffer is empty, so at the start of a
    reply a short first message would run out before jitter lets the next one in. That first
    message waits until it holds the line's jitter in audio (up to `MAX_PRIME_S`, and no
    longer than that in time): the model usually delivers that much in a fraction of it."""

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
        self.underruns = 0
        """Messages that left more than `UNDERRUN_S` late."""
        self.waiting_since: float | None = None
        """When the caller stopped speaking, while they wait for an answer (the call sets it)."""
        self.response_latency = Histogram(RESPONSE_BUCKETS_S)
        """Per answer: from the end of the caller's speech to its first agent audio sent."""
        self.dropped_bytes = 0
        """Audio dropped by clears before the caller heard it."""
        self.queued_total = 0
        """All the agent audio ever queued (bytes): a position on this scale says where a
        piece of it lies."""
        self.heard_to = 0
        """Where (on `queued_total`'s scale) the caller stopped hearing at the last clear."""
        self.overflow_bytes = 0
        """Audio refused because the queue was full."""
        self._queued = 0
        self.clears = 0
        self._in_flight: deque[tuple[str, bytes]] = deque()
        """Sent audio whose mark has not echoed yet, per mark: what a hold may have to resend."""
        self.holding = False
        """Sending is paused and Twilio's buffer was emptied: the caller may be interrupting."""
        self._resumed_at = 0.0
        """A hold's silence was chosen, not a gap: lateness counts from its end."""
        self._levels: deque[tuple[float, float]] = deque()
        """(when sent, mean square of its loudest 20 ms) per message, as far back as
        `ECHO_WINDOW_S` plus the lead."""

    def attach(self, stream_sid: str, send: Callable[[str], Awaitable[None]]) -> None:
        """The media stream is up: audio queued before it (the greeting) can now flow. A new
        stream replacing the old one starts with an empty buffer at Twilio: what the old one
        had not played yet is sent again over the new one."""
        now = self._clock()
        if self._send is not None:
            self._requeue(self._take_back(now), now)
        self._stream_sid = stream_sid
        self._send = send
        self._attached_at = now
        self._wake.set()

    def detach(self) -> None:
        """The call let its stream go (Twilio presses keys, then opens a new one): nothing is
        sent until `attach`, and what the caller had not heard goes out again then."""
        if self._send is not None:
            now = self._clock()
            self._requeue(self._take_back(now), now)
        self._send = None

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
        self.queued_total += len(mulaw)
        self._wake.set()

    @property
    def queued_bytes(self) -> int:
        return self._queued

    @property
    def lead_ms(self) -> float:
        """The lead kept now: the configured one plus the round trip, up to `MAX_LEAD_S`."""
        return self._lead_s() * 1000

    def _lead_s(self) -> float:
        return max(self._lead, min(self._lead + self.ledger.round_trip.seconds, MAX_LEAD_S))

    async def hold(self) -> bool:
        """Stops the caller hearing the agent now, keeping what they have not heard at the head
        of the queue (`resume` plays it from there, `clear` drops it); False when nothing was
        playing."""
        self.holding = True
        async with self._sending:
            now = self._clock()
            if self._send is None or not self.ledger.holds_audio(now):
                return False
            held = self._take_back(now)
            self.clears += 1
            await self._send(clear_message(self._stream_sid))
            if not self.holding:  # a clear came while the clear went out: nothing is kept
                return True
            self._requeue(held, now)
        return True

    def _take_back(self, now: float) -> bytes:
        """Forgets the audio sent to Twilio (as a clear sent now does) and returns the part
        of it the caller has not heard. A clear sent now reaches Twilio a one-way trip later,
        and the play position it cuts at lies a round trip before the last echo is due."""
        trip = self.ledger.round_trip.seconds
        unheard = int(max(0.0, self.ledger.unplayed_ms(now) / 1000 - trip) * BYTES_PER_SECOND)
        sent = b"".join(chunk for _, chunk in self._in_flight)
        self._in_flight.clear()
        self.ledger.cleared(now)
        return sent[len(sent) - min(unheard, len(sent)) :]

    def _requeue(self, held: bytes, now: float) -> None:
        """Puts audio taken back at the head of the queue, in messages as `enqueue` makes."""
        for i in range(len(held) - len(held) % MAX_MESSAGE_BYTES, -1, -MAX_MESSAGE_BYTES):
            if piece := held[i : i + MAX_MESSAGE_BYTES]:
                self._queue.appendleft((now, piece))
        self._queued += len(held)

    def resume(self) -> None:
        """Plays on from where the caller stopped hearing (see `hold`)."""
        self.holding = False
        self._resumed_at = self._clock()
        self._wake.set()

    def loudest_recent(self, now: float) -> float:
        """The loudest 20 ms of agent audio (mean square) the caller may be hearing now, or
        hearing echoed back: what was sent within the lead, the round trip and `ECHO_WINDOW_S`.
        20 ms, as the caller's audio is judged frame by frame: a message's mean puts a syllable
        some 5 dB below its loudest frames, and their echo above the echo margin."""
        since = now - self._lead_s() - self.ledger.round_trip.seconds - ECHO_WINDOW_S
        levels = self._levels
        while levels and levels[0][0] < since:
            levels.popleft()
        return max((level for _, level in levels), default=0.0)

    def busy(self) -> bool:
        """Agent audio is waiting to be sent or may still be playing at the caller's end."""
        return bool(self._queue) or self.ledger.holds_audio(self._clock())

    async def clear(self) -> bool:
        """Drop every unsent byte and empty Twilio's buffer; False when nothing was pending."""
        dropped = self.queued_bytes
        self._queue.clear()
        self._queued = 0
        self.holding = False
        # After a media message already on its way, never before it: that one would play.
        async with self._sending:
            now = self._clock()
            send = self._send if self.ledger.holds_audio(now) else None
            if send is not None:
                dropped += len(self._take_back(now))
            self.dropped_bytes += dropped
            self.heard_to = self.queued_total - dropped
            if send is None:
                return dropped > 0
            self.clears += 1
            await send(clear_message(self._stream_sid))
        return True

    def on_mark(self, name: str) -> bool:
        played = self.ledger.mark_echoed(name, self._clock())
        if played:
            while self._in_flight and self._in_flight.popleft()[0] != name:
                pass
        return played

    def _prime_s(self, now: float) -> float:
        """How much audio the next message should gather before it goes: the jitter, when it
        would reach Twilio after its buffer ran dry, else nothing."""
        if now < self.ledger.send_by:
            return 0.0
        # Echoes show the downlink's jitter only once several replies have started (the
        # excess of one reply's echoes all share its first message's delay): until then,
        # assume it may reach the one-way delay.
        trip = self.ledger.round_trip
        return min(max(trip.jitter_s, trip.seconds / 2), MAX_PRIME_S)

    def _due(self) -> float:
        """Seconds until the next message may go (<= 0: now); inf when there is nothing to send."""
        if not self._queue or self._send is None or self.holding:
            return float("inf")
        now = self._clock()
        prime = self._prime_s(now)
        if self._queued / BYTES_PER_SECOND < prime:
            return self._queue[0][0] + prime - now
        return self.ledger.unplayed_ms(now) / 1000 - self._lead_s()

    async def flush(self) -> None:
        """Sends every message that is due now. The pump calls it right after enqueueing, so
        agent audio leaves in the same step it arrived in rather than one loop turn later."""
        async with self._sending:
            while (send := self._send) is not None and self._due() < 0:
                now = self._clock()
                queued_at, chunk = self._queue.popleft()
                # A deliberate wait for a first message's audio is no gap the caller hears.
                ready = max(
                    self.ledger.send_by,
                    queued_at + self._prime_s(now),
                    self._attached_at,
                    self._resumed_at,
                )
                # What is due now goes as one message, filled up to MAX_MESSAGE_BYTES with
                # what waits behind it: jitter can open no gap inside it, and each message (and
                # its mark) costs a JSON frame both ways, a mark echo and ledger work
                # whatever its size. Twilio then holds up to one message beyond the lead.
                while self._queue and len(chunk) + len(self._queue[0][1]) <= MAX_MESSAGE_BYTES:
                    chunk += self._queue.popleft()[1]
                self._queued -= len(chunk)
                self._mark_seq += 1
                name = str(self._mark_seq)
                gap = max(0.0, now - ready)
                self.gaps.observe(gap)
                if gap > UNDERRUN_S:
                    self.underruns += 1
                if self.waiting_since is not None:
                    self.response_latency.observe(now - self.waiting_since)
                    self.waiting_since = None
                self.ledger.sent(len(chunk), now)
                self.ledger.mark_sent(name)
                self._in_flight.append((name, chunk))
                self._levels.append((now, _loudest_20ms(chunk)))
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
