"""The recorded-call library (tests/calls/, see its README) replayed against the echo agent on a
virtual clock: each call must go as it went when it was recorded, and as the scenario demands."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path

import pytest

from telephony.call.recording import Recording, load_recording
from telephony.testing.replay import (
    CallFigures,
    ReplayResult,
    compare,
    figures_from_log,
    figures_from_recording,
    replay,
    replay_in_process,
)
from telephony.testing.simulator import CallLog

from .server import running_server

CALLS = Path(__file__).parent / "calls"


@functools.cache
def replayed(name: str) -> ReplayResult:
    return replay_in_process(CALLS / f"{name}.jsonl.gz")


def answered(f: CallFigures, utterances: int) -> None:
    """Greeting, then one echo per utterance, each starting within a second of its end."""
    assert len(f.caller_speech) == utterances
    assert len(f.agent_turns) == utterances + 1
    assert f.agent_turns[0][0] < 0.1  # the chime plays as soon as the stream opens
    assert len(f.response_latencies) == utterances
    assert all(0.3 < latency < 1.0 for latency in f.response_latencies)


def media_after(recording: Recording, t: float) -> list[float]:
    start = recording.stream_start or 0.0
    return [u - start for u, m in recording.twilio_out() if m["event"] == "media" and u - start > t]


def check_one_turn(r: ReplayResult) -> None:
    answered(r.figures, 1)
    assert r.figures.clears == []
    assert r.figures.caller_transcripts == ["(caller spoke for 2.9 s)"]


def check_several_turns(r: ReplayResult) -> None:
    answered(r.figures, 3)  # en-gb, fr, de
    assert r.figures.clears == []
    assert len(r.figures.agent_transcripts or []) == 4


def check_early_barge_in(r: ReplayResult) -> None:
    f = r.figures
    assert len(f.caller_speech) == 2 and len(f.clears) == 1
    assert f.interruptions == 1  # the model was still generating
    onset = f.caller_speech[1][0]
    assert 0 <= f.clears[0] - onset <= 0.3
    assert f.agent_turns[1][1] == pytest.approx(f.clears[0], abs=0.01)  # cut where it was cleared
    # Nothing of the interrupted turn after the clear: the next audio is the new echo.
    assert r.recording is not None
    assert min(media_after(r.recording, f.clears[0])) >= f.caller_speech[1][1]
    assert (f.agent_transcripts or [])[-1] == "(echo of 2.3 s)"


def check_late_barge_in(r: ReplayResult) -> None:
    f = r.figures
    assert len(f.caller_speech) == 2 and len(f.clears) == 1
    assert f.interruptions == 0  # generation had finished: only local VAD could catch it
    onset = f.caller_speech[1][0]
    assert 0 <= f.clears[0] - onset <= 0.3
    assert f.clears[0] - f.agent_turns[1][0] > 2.0  # well into playback
    assert r.recording is not None
    assert min(media_after(r.recording, f.clears[0])) >= f.caller_speech[1][1]


def check_dtmf_mid_call(r: ReplayResult) -> None:
    answered(r.figures, 2)
    assert r.recording is not None
    digits = [m["dtmf"]["digit"] for _, m in r.recording.twilio_in() if m["event"] == "dtmf"]
    assert "".join(digits) == "4207#"


def check_noisy_no_speech(r: ReplayResult) -> None:
    f = r.figures
    assert f.caller_speech == [] and f.clears == []
    assert len(f.agent_turns) == 1  # the greeting, nothing else
    assert f.caller_transcripts == []


def check_noisy_speech(r: ReplayResult) -> None:
    answered(r.figures, 1)
    assert r.figures.clears == []


def check_long_silence_then_speech(r: ReplayResult) -> None:
    answered(r.figures, 1)
    assert r.figures.caller_speech[0][0] > 5.5


def check_hang_up_mid_reply(r: ReplayResult) -> None:
    f = r.figures
    assert f.end_reason == "caller hung up (stop)"
    assert f.marks_echoed < f.marks_sent  # audio still queued at Twilio when the caller left
    assert r.recording is not None
    hung_up = max(t for t, m in r.recording.twilio_in() if m["event"] == "stop")
    assert not media_after(r.recording, hung_up - (r.recording.stream_start or 0.0))


def check_socket_drops(r: ReplayResult) -> None:
    assert r.figures.end_reason == "media stream closed"
    assert r.recording is not None
    assert not [m for _, m in r.recording.twilio_in() if m["event"] == "stop"]


def check_frames_stop(r: ReplayResult) -> None:
    f = r.figures
    assert len(f.caller_speech) >= 1 and len(f.agent_turns) == 2
    # No silence frames to time the end of speech by: the bridge's caller-silence watch
    # (1 s) tells the model the audio ended.
    assert 1.0 <= f.response_latencies[-1] <= 2.0


CHECKS: dict[str, Callable[[ReplayResult], None]] = {
    name.removeprefix("check_"): check
    for name, check in list(globals().items())
    if name.startswith("check_")
}


def test_the_library_has_every_scenario() -> None:
    assert sorted(CHECKS) == sorted(p.name.removesuffix(".jsonl.gz") for p in CALLS.glob("*.gz"))
    assert len(CHECKS) >= 10


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_recorded_call_replays_the_same_way(name: str) -> None:
    result = replayed(name)
    assert result.differences(tolerance_s=0.3) == []
    assert result.figures.end_reason == result.original.end_reason
    assert result.log.protocol_errors == []
    assert result.leftover_tasks == []
    if result.figures.end_reason == "caller hung up (stop)" and name != "hang_up_mid_reply":
        assert result.figures.marks_echoed == result.figures.marks_sent


@pytest.mark.parametrize("name", sorted(CHECKS))
@pytest.mark.parametrize("which", ["recorded", "replayed"])
def test_recorded_call_meets_its_scenario(name: str, which: str) -> None:
    if which == "replayed":
        CHECKS[name](replayed(name))
    else:
        original = load_recording(CALLS / f"{name}.jsonl.gz")
        figures = figures_from_recording(original)
        CHECKS[name](ReplayResult(figures, figures, CallLog(), original))


def test_replay_in_real_time_against_a_running_server(tmp_path: Path) -> None:
    """The same call, replayed over the network against a real server on the wall clock."""
    record_dir = tmp_path / "recordings"
    with running_server(tmp_path, record_dir=str(record_dir)) as server:
        result = asyncio.run(
            replay(CALLS / "late_barge_in.jsonl.gz", url=server.base_url, record_dir=record_dir)
        )
    assert result.recording is not None
    assert result.differences(tolerance_s=0.3) == []
    check_late_barge_in(result)
    twilio_side = figures_from_log(result.log)  # what the caller's end saw agrees
    assert compare(result.figures, twilio_side, tolerance_s=0.1) == []


def test_the_call_replay_fixture_is_installed(call_replay: Callable[..., ReplayResult]) -> None:
    result = call_replay(CALLS / "one_turn.jsonl.gz", agent="echo")
    assert result.differences() == []
