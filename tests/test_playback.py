"""What Twilio still holds unplayed, and the paced player, on an injected clock."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable

import pytest

from telephony.call.playback import (
    ECHO_WINDOW_S,
    MAX_LEAD_S,
    PlaybackLedger,
    Player,
    RoundTrip,
    UnknownMark,
)


def test_ledger_tracks_unplayed_audio_by_clock_and_marks() -> None:
    ledger = PlaybackLedger()
    ledger.sent(8000, now=10.0)
    ledger.mark_sent("a")
    ledger.sent(4000, now=10.2)
    ledger.mark_sent("b")
    assert ledger.unplayed_ms(10.0) == pytest.approx(1500)
    assert ledger.unplayed_ms(11.0) == pytest.approx(500)
    # Twilio was late: mark "a" arrives at 11.3, so "b"'s 0.5 s still lies ahead.
    assert ledger.mark_echoed("a", now=11.3) is True
    assert ledger.unplayed_ms(11.3) == pytest.approx(500)
    assert ledger.mark_echoed("b", now=11.8) is True
    assert ledger.unplayed_ms(11.8) == 0
    assert (ledger.marks_sent, ledger.marks_played, ledger.pending_marks) == (2, 2, 0)


def test_ledger_counts_marks_echoed_by_a_clear_as_cleared() -> None:
    ledger = PlaybackLedger()
    ledger.sent(8000, now=0.0)
    ledger.mark_sent("a")
    ledger.cleared(now=0.3)
    assert ledger.unplayed_ms(0.3) == 0
    assert ledger.mark_echoed("a", now=0.31) is False
    assert (ledger.marks_played, ledger.marks_cleared, ledger.pending_marks) == (0, 1, 0)
    with pytest.raises(UnknownMark):
        ledger.mark_echoed("a", now=0.4)


def test_the_round_trip_is_the_smallest_recent_sample() -> None:
    trip = RoundTrip(window_s=10.0)
    assert (trip.seconds, trip.jitter_s) == (0, 0)  # no echo yet
    trip.observe(0.7, now=0.0)
    trip.observe(0.5, now=1.0)
    trip.observe(0.6, now=2.0)
    assert trip.seconds == 0.5
    assert trip.jitter_s == pytest.approx(0.2)
    trip.observe(0.65, now=10.5)  # the 0.7 of t=0 is out of the window, the 0.5 of t=1 not
    assert trip.seconds == 0.5
    assert trip.jitter_s == pytest.approx(0.15)
    trip.observe(0.9, now=30.0)  # the line became slower: believed once the window has passed
    assert (trip.seconds, trip.jitter_s) == (0.9, 0)


def test_ledger_learns_the_round_trip_from_echoes_that_come_back_late_by_it() -> None:
    """150 ms each way: what leaves at 0 plays from 0.15 at Twilio, echoes 150 ms later."""
    ledger = PlaybackLedger()
    ledger.sent(1600, now=0.0)
    ledger.mark_sent("a")
    ledger.sent(1600, now=0.0)
    ledger.mark_sent("b")
    assert ledger.mark_echoed("a", now=0.5) is True  # played 0.15-0.35 there
    assert ledger.round_trip.seconds == pytest.approx(0.3)
    assert ledger.unplayed_ms(0.5) == pytest.approx(200)
    assert ledger.mark_echoed("b", now=0.7) is True
    assert ledger.round_trip.seconds == pytest.approx(0.3)
    assert ledger.unplayed_ms(0.7) == 0 and not ledger.holds_audio(0.7)
    # The next reply: its echo is due a round trip after it played, and more must leave by
    # 5.2 to reach Twilio (at 5.35) before what it holds runs out.
    ledger.sent(1600, now=5.0)
    ledger.mark_sent("c")
    assert ledger.unplayed_ms(5.0) == pytest.approx(500)
    assert ledger.send_by == pytest.approx(5.2)
    # An echo late by jitter (or by a gap at Twilio's end) says nothing new.
    assert ledger.mark_echoed("c", now=5.65) is True
    assert ledger.round_trip.seconds == pytest.approx(0.3)


def test_after_a_clear_nothing_counts_as_playing_and_its_echoes_teach_nothing() -> None:
    ledger = PlaybackLedger()
    ledger.sent(1600, now=0.0)
    ledger.mark_sent("a")
    ledger.mark_echoed("a", now=0.5)
    ledger.sent(8000, now=1.0)
    ledger.mark_sent("b")
    ledger.cleared(now=1.1)
    assert ledger.unplayed_ms(1.1) == 0 and not ledger.holds_audio(1.1)
    assert ledger.mark_echoed("b", now=1.4) is False  # long before "b" could have played
    assert ledger.round_trip.seconds == pytest.approx(0.3)
    ledger.sent(1600, now=1.5)  # the next reply: the cleared second is not ahead of it
    ledger.mark_sent("c")
    assert ledger.unplayed_ms(1.5) == pytest.approx(500)
    assert ledger.mark_echoed("c", now=2.0) is True
    assert ledger.round_trip.seconds == pytest.approx(0.3)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_player_keeps_only_the_lead_ahead_and_clears_everything() -> None:
    clock = FakeClock()
    sent, send = _wire()

    player = Player(lead_ms=400, clock=clock)
    task = asyncio.create_task(player.run())
    player.enqueue(b"\x00" * 8000)  # 1 s, split into 200 ms messages
    await asyncio.sleep(0)
    assert sent == []  # no stream attached yet: the greeting waits
    player.attach("MZ1", send)
    for _ in range(5):
        await asyncio.sleep(0)
    media = [m for m in sent if m["event"] == "media"]
    # 200 ms messages go out while Twilio holds less than the 400 ms lead.
    assert len(media) == 2
    clock.now += 0.1
    player.enqueue(b"")  # wakes the player, as new agent audio would
    for _ in range(5):
        await asyncio.sleep(0)
    media = [m for m in sent if m["event"] == "media"]
    assert len(media) == 3
    assert [m["event"] for m in sent[:2]] == ["media", "mark"]
    assert player.busy()
    assert await player.clear() is True
    assert sent[-1] == {"event": "clear", "streamSid": "MZ1"}
    assert player.queued_bytes == 0 and player.dropped_bytes == 7200
    assert player.heard_to == 800  # the caller heard 100 ms of the second
    assert player.ledger.unplayed_ms(clock.now) == 0
    for name in ("1", "2", "3"):
        assert player.on_mark(name) is False
    assert not player.busy()
    assert await player.clear() is False
    task.cancel()


async def test_flush_sends_what_is_due_at_once_and_keeps_media_and_mark_together() -> None:
    """The pump flushes right after enqueueing: no loop turn between model audio and media.
    Two flushes racing (pump and player) must still pair each media with its own mark."""
    clock = FakeClock()
    sent: list[dict[str, object]] = []

    async def slow_send(text: str) -> None:
        await asyncio.sleep(0)  # a socket write that yields, as a real one may
        sent.append(json.loads(text))

    player = Player(lead_ms=400, clock=clock)
    player.attach("MZ1", slow_send)
    player.enqueue(b"\x00" * 8000)
    await asyncio.gather(player.flush(), player.flush())
    assert [m["event"] for m in sent] == ["media", "mark", "media", "mark"]
    assert [m["mark"]["name"] for m in sent if m["event"] == "mark"] == ["1", "2"]
    assert player.queued_bytes == 4800  # the rest waits for the lead to drain
    await player.flush()
    assert len(sent) == 4


async def test_clear_never_overtakes_a_media_message_in_flight() -> None:
    clock = FakeClock()
    sent: list[str] = []

    async def slow_send(text: str) -> None:
        await asyncio.sleep(0)
        sent.append(json.loads(text)["event"])

    player = Player(lead_ms=400, clock=clock)
    player.attach("MZ1", slow_send)
    player.enqueue(b"\x00" * 8000)
    flushing = asyncio.create_task(player.flush())
    await asyncio.sleep(0)  # the first media message is on its way
    assert await player.clear() is True
    await flushing
    assert sent == ["media", "mark", "clear"]
    assert player.queued_bytes == 0


async def test_agent_audio_beyond_two_minutes_of_backlog_is_dropped_and_counted() -> None:
    player = Player(lead_ms=400, clock=FakeClock())
    player.enqueue(b"\x00" * 8000 * 119)
    player.enqueue(b"\x00" * 8000 * 3)
    assert player.queued_bytes == 8000 * 120
    assert player.overflow_bytes == 8000 * 2
    player.enqueue(b"\x00" * 100)
    assert player.overflow_bytes == 8000 * 2 + 100
    await player.clear()
    assert player.queued_bytes == 0
    player.enqueue(b"\x00" * 100)
    assert player.queued_bytes == 100


async def test_late_messages_are_measured_as_gaps_the_caller_heard() -> None:
    clock = FakeClock()
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    player = Player(lead_ms=400, clock=clock)
    player.attach("MZ1", send)
    player.enqueue(b"\x00" * 1600)  # 200 ms, sent at once
    await player.flush()
    player.enqueue(b"\x00" * 1600)  # queued while the first still plays: due on time
    clock.now += 0.35  # ...but the player only gets to it 150 ms after the first ran out
    await player.flush()
    assert player.gaps.count == 2
    assert player.gaps.counts[0] == 1  # the first: on time
    assert player.gaps.total == pytest.approx(0.15)
    assert player.gaps.counts[6] == 1  # in the (0.1, 0.2] s bucket


async def test_the_lead_grows_by_the_round_trip_up_to_a_bound() -> None:
    clock = FakeClock()
    start = clock.now
    sent, send = _wire()

    player = Player(lead_ms=400, clock=clock)
    player.attach("MZ1", send)
    player.enqueue(b"\x00" * 8000 * 3)
    await player.flush()
    assert len([m for m in sent if m["event"] == "media"]) == 2  # 400 ms, the lead
    assert player.lead_ms == 400
    clock.now = start + 0.4  # 100 ms each way: the first 200 ms played until 0.3 there
    assert player.on_mark("1") is True
    assert player.lead_ms == pytest.approx(600)
    await player.flush()
    # 400 ms more: they reach Twilio at 0.5, as the second message ends, and from then on it
    # holds the 400 ms lead whenever more arrives.
    assert len([m for m in sent if m["event"] == "media"]) == 4
    player.ledger.round_trip.observe(0.1, clock.now)  # (a faster sample wins at once)
    assert player.lead_ms == pytest.approx(500)
    player = Player(lead_ms=400, clock=clock)
    player.ledger.round_trip.observe(1.5, clock.now)
    assert player.lead_ms == MAX_LEAD_S * 1000  # a barge-in must not have seconds to clear
    player = Player(lead_ms=2000, clock=clock)
    player.ledger.round_trip.observe(0.5, clock.now)
    assert player.lead_ms == 2000  # a longer lead asked for stays


async def test_a_clear_reaches_audio_still_on_its_way_to_the_caller() -> None:
    """Before the first echo the ledger cannot know the line's delay: until the mark echoes,
    the audio may still be playing (or not even have arrived), so a barge-in must clear it."""
    clock = FakeClock()
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(json.loads(text)["event"])

    player = Player(lead_ms=400, clock=clock)
    player.attach("MZ1", send)
    player.enqueue(b"\x00" * 1600)
    await player.flush()
    clock.now += 0.25  # 200 ms later: on a 300 ms line Twilio is still playing it
    assert player.busy()
    assert await player.clear() is True
    assert sent == ["media", "mark", "clear"]
    assert player.on_mark("1") is False
    assert not player.busy()


async def test_a_reply_starts_with_one_message_that_outlasts_the_jitter() -> None:
    """Twilio plays the first message as soon as it arrives: if it were 40 ms long, the next
    one, 90 ms later by jitter, would leave a 50 ms silence."""
    clock = FakeClock()
    sent, send = _wire()

    def media() -> list[int]:
        """The length of each media message sent."""
        return [len(base64.b64decode(m["media"]["payload"])) for m in sent if "media" in m]

    player = Player(lead_ms=400, clock=clock)
    player.attach("MZ1", send)
    for sample in (0.2, 0.38):  # echoes that vary by 180 ms
        player.ledger.round_trip.observe(sample, clock.now)
    for _ in range(4):  # 160 ms of the model's 40 ms chunks
        player.enqueue(b"\x00" * 320)
        await player.flush()
    assert media() == []
    clock.now += 0.04
    player.enqueue(b"\x00" * 320)
    await player.flush()
    assert media() == [1600]  # 180 ms gathered: one message
    player.enqueue(b"\x00" * 320)
    await player.flush()
    assert media() == [1600, 320]  # the rest of the reply flows as it comes
    assert player.gaps.counts[0] == 2  # a deliberate wait is no gap
    # A reply shorter than the jitter waits no longer than the jitter.
    clock.now += 10
    player.enqueue(b"\x00" * 320)
    await player.flush()
    assert len(media()) == 2
    clock.now += 0.181
    await player.flush()
    assert media()[2:] == [320]


def _wire() -> tuple[list[dict[str, object]], Callable[[str], Awaitable[None]]]:
    """What the player sends to Twilio, decoded, and the sender that collects it."""
    sent: list[dict[str, object]] = []

    async def send(text: str) -> None:
        sent.append(json.loads(text))

    return sent, send


def _media_audio(sent: list[dict[str, object]]) -> bytes:
    return b"".join(
        base64.b64decode(m["media"]["payload"])  # type: ignore[index]
        for m in sent
        if m["event"] == "media"
    )


async def _heard_300_ms(
    player: Player, clock: FakeClock, send: Callable[[str], Awaitable[None]]
) -> bytes:
    """Plays a 1.28 s reply, every byte telling where it was, 400 ms ahead of the caller's
    ear, until they have heard 300 ms of it; returns the reply."""
    player.attach("MZ1", send)
    reply = bytes(range(256)) * 40
    player.enqueue(reply)
    await player.flush()  # 400 ms out
    assert player.on_mark("1") is True  # the first 200 ms played...
    clock.now += 0.3  # ...and 100 ms of the second
    return reply


async def test_a_hold_clears_twilio_and_resume_plays_on_from_where_the_caller_stopped() -> None:
    """A cough over the agent: what the caller had not heard comes back, none of it twice."""
    clock = FakeClock()
    sent, send = _wire()
    player = Player(lead_ms=400, clock=clock)
    reply = await _heard_300_ms(player, clock, send)
    assert await player.hold() is True
    assert sent[-1] == {"event": "clear", "streamSid": "MZ1"}
    assert player.busy()
    player.enqueue(b"\x01" * 800)  # the model goes on meanwhile: queued, not sent
    await player.flush()
    assert sent[-1]["event"] == "clear"
    before = len(_media_audio(sent))
    assert player.on_mark("2") is False  # echoed by the clear
    player.resume()
    echoed = {"1", "2"}
    for _ in range(10):
        await player.flush()
        clock.now += 0.2
        for m in [m for m in sent if m["event"] == "mark"]:
            name = m["mark"]["name"]  # type: ignore[index]
            if name not in echoed:
                echoed.add(name)
                assert player.on_mark(name) is True
    resent = _media_audio(sent)[before:]
    assert resent == reply[2400:] + b"\x01" * 800  # from 300 ms on, then what came meanwhile


async def test_a_new_stream_gets_what_the_old_one_had_not_played() -> None:
    """Twilio reconnected the stream: its buffer on the old one is gone, so the audio the
    caller had not heard goes out again, first, over the new one (and no clear: it is new)."""
    clock = FakeClock()
    _, send_old = _wire()
    new, send_new = _wire()
    player = Player(lead_ms=400, clock=clock)
    reply = await _heard_300_ms(player, clock, send_old)
    player.attach("MZ2", send_new)
    await player.flush()
    assert {m["event"] for m in new} == {"media", "mark"}
    assert reply[2400:].startswith(_media_audio(new))
    assert all(m["streamSid"] == "MZ2" for m in new)


async def test_a_hold_then_clear_drops_the_held_audio() -> None:
    clock = FakeClock()
    sent, send = _wire()

    player = Player(lead_ms=400, clock=clock)
    player.attach("MZ1", send)
    player.enqueue(b"\x00" * 8000)
    await player.flush()
    assert await player.hold() is True
    assert await player.clear() is True  # the held second is dropped: a real interruption
    assert player.queued_bytes == 0 and not player.holding
    assert [m["event"] for m in sent].count("clear") == 1  # Twilio was emptied by the hold


async def test_a_hold_with_nothing_playing_holds_nothing() -> None:
    player = Player(lead_ms=400, clock=FakeClock())

    async def send(text: str) -> None:
        raise AssertionError("nothing to clear")

    player.attach("MZ1", send)
    assert await player.hold() is False
    player.resume()
    assert not player.busy()


async def test_the_loudest_recent_agent_audio_is_known_until_its_echo_could_be_over() -> None:
    clock = FakeClock()

    async def send(text: str) -> None:
        pass

    player = Player(lead_ms=400, clock=clock)
    player.attach("MZ1", send)
    player.enqueue(b"\x80" * 1600)  # the loudest mu-law
    await player.flush()
    loud = player.loudest_recent(clock.now)
    assert loud > 0.9 * 32124**2
    clock.now += 0.4 + ECHO_WINDOW_S - 0.01
    assert player.loudest_recent(clock.now) == loud  # its echo may still come back
    clock.now += 0.02
    assert player.loudest_recent(clock.now) == 0.0


async def test_the_loudest_recent_agent_audio_is_its_loudest_20_ms() -> None:
    """Caller audio is judged 20 ms at a time: so is the agent audio its echo is compared with,
    not a whole message's mean."""
    clock = FakeClock()

    async def send(text: str) -> None:
        pass

    player = Player(lead_ms=400, clock=clock)
    player.attach("MZ1", send)
    player.enqueue(b"\xff" * 1440 + b"\x80" * 160)  # 180 ms of silence, 20 ms at full scale
    await player.flush()
    assert player.loudest_recent(clock.now) > 0.9 * 32124**2
