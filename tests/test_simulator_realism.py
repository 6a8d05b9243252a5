"""The caller simulator's realism options (network delay and jitter, interjections, echo, key
bursts), measured against an in-memory server end on a virtual clock: exact and fast. One call
goes through the real app, and one through `telephony simulate`."""

from __future__ import annotations

import asyncio
import json
from base64 import b64decode
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from telephony.audio import mulaw_encode
from telephony.audio.wavfile import write_wav
from telephony.cli import main as cli
from telephony.server.app import create_app
from telephony.settings import Settings
from telephony.testing.simulator import (
    SILENCE,
    CallerSimulator,
    CallLog,
    Echo,
    Interjection,
    Network,
    place_call,
    sound,
)
from telephony.testing.virtual_clock import run_virtual
from telephony.twilio.media_stream import clear_message, mark_message, media_message

from .audio_tools import best_correlation, fixture, pcm

T = TypeVar("T")
Message = dict[str, Any]
SAMPLE = 1 / 8000
EPS = 1e-6


class Wire:
    """The server's end of the Media Stream, in memory: every message from the simulator
    is kept with the time it arrived (and handed to `react`, so the "server" can answer in
    the same instant); what the test sends leaves at once."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._out: asyncio.Queue[str | None] = asyncio.Queue()
        self.arrived: list[tuple[float, Message]] = []
        self.react: Callable[[Message], None] = lambda message: None
        self.stream_sid = ""

    async def send(self, message: str) -> None:
        msg = json.loads(message)
        self.arrived.append((self._loop.time(), msg))
        self.react(msg)

    async def __aiter__(self) -> AsyncIterator[str]:
        while (message := await self._out.get()) is not None:
            yield message

    async def close(self) -> None:
        self._out.put_nowait(None)

    def play(self, mulaw: bytes) -> None:
        self._out.put_nowait(media_message(self.stream_sid, mulaw))

    def mark(self, name: str) -> None:
        self._out.put_nowait(mark_message(self.stream_sid, name))

    def clear(self) -> None:
        self._out.put_nowait(clear_message(self.stream_sid))

    def events(self, kind: str) -> list[tuple[float, Message]]:
        return [(t, m) for t, m in self.arrived if m["event"] == kind]


async def open_call(wire: Wire, **options: Any) -> CallerSimulator:
    sim = CallerSimulator(wire, call_sid="CA" + "1" * 32, parameters={}, **options)
    wire.stream_sid = sim.stream_sid
    await sim.begin()
    return sim


async def until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - asyncio.get_running_loop().time()))


def now() -> float:
    return asyncio.get_running_loop().time()


def virtual(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return run_virtual(main())


def tone(seconds: float, freq: float = 440.0, amplitude: float = 8000.0) -> bytes:
    t = np.arange(int(8000 * seconds)) / 8000
    return mulaw_encode((amplitude * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes())


def uplink(log: CallLog) -> np.ndarray:
    """The caller's continuous uplink, one sample per 1/8000 s from the stream's start."""
    return pcm(b"".join(payload for _, payload in log.sent))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x.astype(np.float64)))))


def test_mark_echoes_take_both_one_way_delays() -> None:
    async def main() -> tuple[dict[str, float], dict[str, float]]:
        wire = Wire()
        sim = await open_call(wire, network=Network(0.15, 0.025, seed=1))
        sent = {"bare": now()}
        wire.mark("bare")  # nothing queued: Twilio echoes it on arrival
        await until(1.0)
        sent["after audio"] = now()
        wire.play(tone(0.5))
        wire.mark("after audio")
        await until(3.0)
        await sim.close()
        return sent, {m["mark"]["name"]: t for t, m in wire.events("mark")}

    sent, echoed = virtual(main)
    bare = echoed["bare"] - sent["bare"]
    assert 0.3 <= bare <= 0.3 + 2 * 0.025 + EPS
    after = echoed["after audio"] - sent["after audio"]
    assert 0.3 + 0.5 <= after <= 0.3 + 0.5 + 2 * 0.025 + EPS

    async def perfect() -> float:
        wire = Wire()
        sim = await open_call(wire)
        sent = now()
        wire.mark("bare")
        await until(0.5)
        await sim.close()
        return wire.events("mark")[0][0] - sent

    assert virtual(perfect) == 0.0  # off by default: the echo is instant, as before


def test_jitter_makes_messages_late_and_bunched_never_reordered() -> None:
    network = Network(0.15, 0.05, seed=7)

    async def main() -> tuple[list[tuple[float, Message]], CallLog, list[float]]:
        wire = Wire()
        sim = await open_call(wire, network=network)
        server_sent = []
        for n in range(100):  # the server streams 20 ms chunks in real time, each its own
            await until(0.5 + n * 0.02)
            server_sent.append(now())
            wire.play(bytes([n]) * 160)
        await until(3.0)
        await sim.close()
        return wire.arrived, sim.log, server_sent

    arrived, log, server_sent = virtual(main)
    # upstream: every message in order, each frame 150-200 ms late, bunched at times
    numbered = [int(m["sequenceNumber"]) for _, m in arrived if "sequenceNumber" in m]
    assert numbered == sorted(numbered) == list(range(1, len(numbered) + 1))
    media = [t for t, m in arrived if m["event"] == "media"]
    late = [t - sent for t, (sent, _) in zip(media, log.sent, strict=False)]
    assert len(late) > 100 and 0.15 - EPS <= min(late) and max(late) <= 0.2 + EPS
    gaps = np.diff(media)
    assert gaps.min() < 0.005 and gaps.max() > 0.03  # bunched, then a wait
    # downstream: heard in the order sent, each chunk 150-200 ms after it left the server
    assert [h.audio[0] for h in log.heard] == list(range(100))
    received = [h.received for h in log.heard]
    assert received == sorted(received)
    down = [r - s for r, s in zip(received, server_sent, strict=True)]
    assert 0.15 - EPS <= min(down) and max(down) <= 0.2 + EPS
    assert max(down) - min(down) > 0.02
    # the same seed, the same call
    assert [t for t, _ in virtual(main)[0]] == [t for t, _ in arrived]


def test_a_clear_cuts_the_caller_off_a_one_way_delay_after_it_was_sent() -> None:
    async def main() -> tuple[CallLog, float, float, float, float]:
        wire = Wire()
        sim = await open_call(wire, network=Network(0.15, 0.0))
        cleared: list[float] = []

        def barge_in(msg: Message) -> None:  # the server clears on the caller's first word
            spoke = msg["event"] == "media" and b64decode(msg["media"]["payload"]) != SILENCE
            if spoke and not cleared:
                cleared.append(now())
                wire.clear()

        wire.react = barge_in
        playing = now()
        wire.play(tone(3.0))
        wire.mark("reply")
        await until(1.0)
        onset = await sim.say(tone(1.0, 200.0))
        await until(4.0)
        await sim.close()
        mark = wire.events("mark")[0][0]
        return sim.log, playing, onset, cleared[0], mark

    log, playing, onset, cleared, mark = virtual(main)
    assert cleared == pytest.approx(onset + 0.15)  # the caller's audio is late upstream
    assert log.clears == [pytest.approx(cleared + 0.15)]  # and the clear is late downstream
    assert mark == pytest.approx(cleared + 0.3)  # the flushed mark comes back late again
    # what the caller heard: the reply, from its arrival until the clear reached Twilio
    assert log.heard[0].start == pytest.approx(playing + 0.15)
    heard_after_onset = sum(max(0.0, h.end - max(h.start, onset)) for h in log.heard)
    assert heard_after_onset == pytest.approx(0.3, abs=2 * SAMPLE)
    earpiece = log.heard_pcm(until=log.started + 4.0)
    cut = round((log.clears[0] - log.started) * 8000)
    assert rms(earpiece[cut - 400 : cut - 1]) > 4000 and not earpiece[cut + 1 :].any()


def test_backchannel_and_cough_go_up_at_once_at_their_length() -> None:
    async def main() -> tuple[CallLog, list[float], list[float]]:
        wire = Wire()
        sim = await open_call(wire)
        asked, onsets = [], []
        for at, make in ((0.5, sim.backchannel), (1.5, sim.cough)):
            await until(at + 0.007)  # between two frames: it goes up with the next one
            asked.append(now())
            onsets.append(await make())
        await until(2.5)
        await sim.close()
        return sim.log, asked, onsets

    log, asked, onsets = virtual(main)
    assert log.interjections == [(onsets[0], "mm-hm"), (onsets[1], "cough")]
    up = uplink(log)
    expected = np.zeros(len(up))
    for asked_at, onset, name, length_s in zip(
        asked, onsets, ("mm-hm", "cough"), (0.383, 0.15), strict=True
    ):
        assert 0 < onset - asked_at <= 0.02
        clip = pcm(sound(name))
        assert len(clip) / 8000 == pytest.approx(length_s, abs=0.001)
        at = round((onset - log.started) * 8000)
        expected[at : at + len(clip)] = clip
    assert 0.25 <= len(sound("mm-hm")) / 8000 <= 0.4
    np.testing.assert_array_equal(up, expected)  # over silence: exactly the clips


def test_an_interjection_mixes_over_the_callers_speech() -> None:
    async def main() -> tuple[CallLog, float, float]:
        wire = Wire()
        sim = await open_call(wire)
        await until(0.2)
        speaking = await sim.say(tone(2.0, 300.0, 3000.0))
        await until(1.0)
        onset = await sim.cough()
        await until(2.5)
        await sim.close()
        return sim.log, speaking, onset

    log, speaking, onset = virtual(main)
    up = uplink(log)
    expected = np.zeros(len(up))
    at = round((speaking - log.started) * 8000)
    expected[at : at + 16000] = pcm(tone(2.0, 300.0, 3000.0))
    at = round((onset - log.started) * 8000)
    cough = pcm(sound("cough"))
    expected[at : at + len(cough)] += cough
    # a sum in linear PCM, then mu-law: only the encoder's rounding is left
    assert rms(up - expected) < 0.03 * rms(cough)


def test_declared_interjections_come_once_into_the_reply_as_heard() -> None:
    interjections = [Interjection("mm-hm", after_agent_s=1.0), Interjection("cough", 2.5)]

    async def main() -> tuple[CallLog, float]:
        wire = Wire()
        sim = await open_call(
            wire, network=Network(0.15, 0.02, seed=3), interjections=interjections
        )
        wire.play(tone(3.0))  # a greeting, not a reply, though it plays on past the question
        await until(1.0)
        await sim.say(tone(1.0, 200.0))
        await sim.finish_speaking()
        said = now()
        for reply_start in (said + 0.6, said + 6.0):  # two replies, each paced by the server
            for n in range(100):
                await until(reply_start + n * 0.04)
                wire.play(tone(0.04))
        await until(said + 11.0)
        await sim.close()
        return sim.log, said

    log, said = virtual(main)
    assert [what for _, what in log.interjections] == ["mm-hm", "cough"]
    reply = [h for h in log.heard if said <= h.start < said + 5.0]

    def heard_by(t: float) -> float:
        return sum(max(0.0, min(h.end, t) - h.start) for h in reply)

    for (onset, _), after in zip(log.interjections, (1.0, 2.5), strict=True):
        # the first frame once the caller had heard `after` seconds of the reply (jitter
        # leaves gaps in the playout, which do not count)
        assert heard_by(onset) >= after - EPS > heard_by(onset - 0.02)
    assert log.interjections[0][0] >= reply[0].start + 1.0


@pytest.mark.parametrize("speaking", [False, True])
def test_echo_comes_back_at_its_level_and_delay(speaking: bool) -> None:
    async def main() -> tuple[CallLog, float]:
        wire = Wire()
        sim = await open_call(wire, echo=Echo(level_db=-25.0, delay_s=0.15))
        await until(0.3)
        wire.play(fixture("hello"))
        await until(1.0)
        onset = await sim.say(fixture("stop")) if speaking else 0.0
        await until(5.0)
        await sim.close()
        return sim.log, onset

    log, onset = virtual(main)
    up = uplink(log)
    if speaking:  # take the caller's own words away: the echo is what is left
        at = round((onset - log.started) * 8000)
        words = pcm(fixture("stop"))
        up[at : at + len(words)] -= words
    heard = log.heard_pcm(until=log.started + len(up) / 8000)[: len(up)]
    start, end = round(0.5 * 8000), round(4.0 * 8000)
    score, offset = best_correlation(up, heard[start:end])
    lag = offset - start
    assert score > 0.95
    assert lag == round(0.15 * 8000)
    level = 20 * np.log10(rms(up[start + lag : end + lag]) / rms(heard[start:end]))
    assert level == pytest.approx(-25.0, abs=0.5 if speaking else 0.2)


def test_key_bursts_arrive_in_order_with_their_gap() -> None:
    async def main() -> tuple[Wire, CallLog]:
        wire = Wire()
        sim = await open_call(wire, network=Network(0.15, 0.02, seed=2))
        await until(0.5)
        await sim.press_keys("1234#", gap_s=0.1)
        with pytest.raises(ValueError, match="not phone keys"):
            await sim.press_keys("12x")
        await until(1.5)
        await sim.hang_up()
        return wire, sim.log

    wire, log = virtual(main)
    assert "".join(key for _, key in log.keys) == "1234#"
    assert np.diff([t for t, _ in log.keys]) == pytest.approx([0.1] * 4)
    keys = wire.events("dtmf")
    assert "".join(m["dtmf"]["digit"] for _, m in keys) == "1234#"
    assert all(m["dtmf"]["track"] == "inbound_track" for _, m in keys)
    assert all(0.08 - EPS <= gap <= 0.12 + EPS for gap in np.diff([t for t, _ in keys]))
    # the caller's audio kept flowing between the keys, in order; the stop came last of all
    between = [t for t, _ in wire.events("media") if keys[0][0] < t < keys[-1][0]]
    assert len(between) >= 18
    numbered = [int(m["sequenceNumber"]) for _, m in wire.arrived if "sequenceNumber" in m]
    assert numbered == sorted(numbered)
    assert wire.arrived[-1][1]["event"] == "stop"


def test_a_realistic_call_against_the_echo_agent() -> None:
    """The options through `place_call` and the real app (in-process, virtual clock)."""

    async def main() -> CallLog:
        app = create_app(Settings(agent="echo", session_db=""))
        async with app.test_app():
            async with place_call(
                app=app,
                network=Network(0.15, 0.025, seed=4),
                echo=Echo(-25.0, 0.15),
                interjections=[Interjection("mm-hm", after_agent_s=0.5)],
            ) as sim:
                await asyncio.sleep(1.0)
                await sim.say(fixture("time"))
                await sim.finish_speaking()
                await sim.agent_quiet(1.5, since=now())
                await sim.press_keys("12#")
                await sim.hang_up()
            await app.extensions["telephony.calls"].wait_idle(10.0)
        return sim.log

    log = virtual(main)
    assert log.protocol_errors == []
    assert [what for _, what in log.interjections] == ["mm-hm"]
    assert [key for _, key in log.keys] == ["1", "2", "#"]
    assert log.marks_received > 0 and log.marks_echoed == log.marks_received
    said_at = log.interjections[0][0]
    assert any(h.start < said_at < h.end for h in log.heard)  # into the echo of the question


def test_simulate_command_line_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli(["simulate", "--help"])
    shown = capsys.readouterr().out
    for option in ("--delay-ms", "--jitter-ms", "--seed", "--backchannel-after", "--cough-after"):
        assert option in shown
    for option in ("--echo-db", "--echo-delay-ms", "--keys", "--key-gap-ms"):
        assert option in shown
    wav = tmp_path / "time.wav"
    write_wav(wav, pcm(fixture("time")).astype(np.int16), 8000)
    for bad, message in (
        (["--keys", "12x"], "not phone keys"),
        (["--delay-ms", "-5"], "cannot be negative"),
        (["--echo-db", "-25", "--echo-delay-ms", "-1"], "cannot be negative"),
        (["--cough-after", "-1"], "cannot be negative"),
    ):
        assert cli(["simulate", str(wav), *bad]) == 2  # before dialling
        assert message in capsys.readouterr().err
    # in-process server, in real time (a few seconds)
    options = ["--delay-ms", "150", "--jitter-ms", "25", "--backchannel-after", "0.5"]
    assert cli(["simulate", str(wav), "--settle", "1.0", *options, "--keys", "12#"]) == 0
    out = capsys.readouterr().out
    assert "caller interjected mm-hm at" in out
    assert "caller pressed 1 at" in out and "caller pressed # at" in out
