"""What Twilio still holds unplayed, and the paced player, on an injected clock."""

from __future__ import annotations

import asyncio
import json

import pytest

from telephony.call.playback import PlaybackLedger, Player, UnknownMark


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


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_player_keeps_only_the_lead_ahead_and_clears_everything() -> None:
    clock = FakeClock()
    sent: list[dict[str, object]] = []

    async def send(text: str) -> None:
        sent.append(json.loads(text))

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
    assert player.queued_bytes == 0 and player.dropped_bytes == 3200
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
