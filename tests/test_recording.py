"""Recording calls: the file format, its WAV, loading damaged files, and record -> replay."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import wave
from pathlib import Path

import numpy as np
import pytest

from telephony.call.recording import RecordingError, load_recording
from telephony.server.app import create_app
from telephony.settings import Settings
from telephony.testing.replay import figures_from_recording, replay_in_process
from telephony.testing.simulator import Echo, place_call
from telephony.testing.virtual_clock import run_virtual

from .audio_tools import best_correlation, fixture, pcm

SID = "CA" + "5" * 32
ECHO_SID = "CA" + "6" * 32


async def _barge_in_call(record_dir: Path) -> None:
    """Caller speaks, then talks over the echo 2 s into its playback."""
    app = create_app(Settings(agent="echo", session_db="", record_dir=str(record_dir)))
    async with app.test_app():
        loop = asyncio.get_running_loop()
        async with place_call(app=app, call_sid=SID) as sim:
            await asyncio.sleep(1.0)
            await sim.say(fixture("hello"))
            await sim.finish_speaking()
            assert await sim.agent_audio_after(loop.time() - 0.1, timeout=5.0) is not None
            await asyncio.sleep(2.0)
            await sim.say(fixture("stop"))
            await sim.finish_speaking()
            await asyncio.sleep(4.0)
            await sim.hang_up()
        await app.extensions["telephony.calls"].wait_idle(5.0)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    record_dir = tmp_path_factory.mktemp("recordings")
    run_virtual(_barge_in_call(record_dir))
    return record_dir


def test_recording_holds_every_message_model_event_and_metadata(recorded: Path) -> None:
    rec = load_recording(recorded / f"{SID}.jsonl")
    assert rec.header["call_sid"] == SID and rec.header["agent"] == "echo"
    assert rec.header["caller"] == "+15550001111" and not rec.truncated
    times = [e.t for e in rec.entries]
    assert times == sorted(times)
    inbound = {m["event"] for _, m in rec.twilio_in()}
    outbound = {m["event"] for _, m in rec.twilio_out()}
    assert inbound == {"connected", "start", "media", "mark", "stop"}
    assert rec.twilio_in()[0][1]["event"] == "connected"
    assert outbound == {"media", "mark", "clear"}
    assert rec.transcripts("input") == ["(caller spoke for 4.0 s)", "(caller spoke for 2.8 s)"]
    assert rec.model("turn_complete") and rec.model("audio")
    assert rec.end_reason == "caller hung up (stop)"
    assert len(rec.clear_times()) == 1


def test_wav_is_the_call_as_heard(recorded: Path) -> None:
    rec = load_recording(recorded / f"{SID}.jsonl")
    with wave.open(str(recorded / f"{SID}.wav")) as w:
        assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (2, 8000, 2)
        frames = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)
    caller, agent = frames[:, 0].astype(float), frames[:, 1].astype(float)
    # The caller's words sit on the left where they were said (1 s in).
    score, at = best_correlation(caller, pcm(fixture("hello")))
    assert score > 0.99 and abs(at / 8000 - 1.0) < 0.03
    # The agent's echo sits on the right, and the clear cut it: silence from the clear
    # until the next echo begins.
    figures = figures_from_recording(rec)
    clear = figures.clears[0]
    next_turn = figures.agent_turns[-1][0]
    assert np.abs(agent[int(clear * 8000) + 8 : int(next_turn * 8000) - 8]).max() == 0
    assert np.abs(agent[int((clear - 0.5) * 8000) : int(clear * 8000)]).max() > 1000
    assert best_correlation(agent, pcm(fixture("stop")))[0] > 0.9


def test_a_recorded_call_replays_the_same_way(recorded: Path) -> None:
    result = replay_in_process(recorded / f"{SID}.jsonl")
    assert result.differences() == []
    assert len(result.figures.clears) == 1


def _write(path: Path, lines: list[str], tail: str = "") -> Path:
    path.write_text("".join(line + "\n" for line in lines) + tail)
    return path


HEADER = json.dumps(
    {"format": "telephony-call", "version": 1, "call_sid": "CA1", "caller": "", "callee": ""}
)
ENTRY = json.dumps({"t": 0.5, "kind": "model", "event": "turn_complete"})


def test_a_truncated_recording_loads_up_to_its_last_complete_line(tmp_path: Path) -> None:
    rec = load_recording(_write(tmp_path / "a.jsonl", [HEADER, ENTRY], tail='{"t": 0.7, "ki'))
    assert rec.truncated and len(rec.entries) == 1


def test_gzipped_recordings_load(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(gzip.compress(f"{HEADER}\n{ENTRY}\n".encode()))
    assert len(load_recording(path).entries) == 1


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "empty"),
        (['{"hello": 1}'], "not a telephony-call recording"),
        ([HEADER.replace('"version": 1', '"version": 2')], "version 2"),
        ([HEADER, "not json", ENTRY], ":2: not JSON"),
        ([HEADER, '{"t": -1, "kind": "end"}'], "'t' must be a non-negative number"),
        ([HEADER, '{"t": 1, "kind": "other"}'], "'kind' must be one of"),
        ([HEADER, '{"t": 1, "kind": "in", "msg": 3}'], "'msg' must be"),
        ([HEADER, '{"t": 1, "kind": "model", "event": "x"}'], "unknown model event"),
    ],
)
def test_damaged_recordings_are_refused_with_the_line_at_fault(
    tmp_path: Path, lines: list[str], message: str
) -> None:
    with pytest.raises(RecordingError, match=message):
        load_recording(_write(tmp_path / "a.jsonl", lines))


def test_missing_recording_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="cannot read"):
        load_recording(tmp_path / "nope.jsonl")


def test_an_unwritable_record_dir_costs_the_recording_not_the_call(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the folder should be")

    async def call() -> int:
        app = create_app(Settings(agent="echo", session_db="", record_dir=str(blocked)))
        async with app.test_app():
            async with place_call(app=app) as sim:
                await asyncio.sleep(1.0)
                await sim.hang_up()
            return len(sim.log.heard)

    assert run_virtual(call()) > 0  # the greeting played


async def _echo_call(record_dir: Path) -> list[bytes]:
    """Caller speaks once; a handset sends the agent's reply back up at -25 dB."""
    app = create_app(Settings(agent="echo", session_db="", record_dir=str(record_dir)))
    async with app.test_app():
        loop = asyncio.get_running_loop()
        async with place_call(app=app, call_sid=ECHO_SID, echo=Echo(-25.0, 0.15)) as sim:
            await asyncio.sleep(1.0)
            await sim.say(fixture("hello"))
            await sim.finish_speaking()
            assert await sim.agent_audio_after(loop.time() - 0.1, timeout=5.0) is not None
            await sim.agent_quiet(1.0)
            await sim.hang_up()
        await app.extensions["telephony.calls"].wait_idle(5.0)
    return [payload for _, payload in sim.log.sent]


def test_a_recording_keeps_the_echo_the_model_never_heard(tmp_path: Path) -> None:
    """The model (here the echo agent, whose VAD would answer the echo) got comfort noise in
    its place; the recording keeps what the caller's end sent, echo and all."""
    sent = run_virtual(_echo_call(tmp_path))
    rec = load_recording(tmp_path / f"{ECHO_SID}.jsonl")
    recorded = [
        base64.b64decode(m["media"]["payload"]) for _, m in rec.twilio_in() if m["event"] == "media"
    ]
    assert recorded == sent
    assert rec.transcripts("input") == ["(caller spoke for 4.0 s)"]
