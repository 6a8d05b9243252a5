"""The call report: values in (a recording), values out (markers, lines, latencies, peaks,
the embedded audio), and the `telephony report` command."""

from __future__ import annotations

import base64
import gzip
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.adk.agents.run_config import RunConfig
from google.adk.runners import Runner
from google.adk.sessions import InMemorySessionService

from telephony.agents.echo import echo_app
from telephony.audio import mulaw_decode, mulaw_encode
from telephony.call import Call, CallInfo, CallOptions
from telephony.call.recording import CallRecorder, load_recording
from telephony.cli import main
from telephony.server.report import (
    build_report,
    heard_audio,
    peaks,
    render,
    write_report,
)
from telephony.testing.replay import replay_in_process
from telephony.testing.virtual_clock import run_virtual
from telephony.twilio.media_stream import Media, Start

CALLS = Path(__file__).parent / "calls"
FIXTURES = Path(__file__).parent / "fixtures"
SID = "CA0123456789abcdef0123456789abcdef"
SILENCE = b"\xff" * 160


def _raw(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _write(tmp_path: Path, entries: list[dict[str, Any]], name: str = SID) -> Path:
    header = {
        "format": "telephony-call",
        "version": 1,
        "call_sid": SID,
        "caller": "+15550001111",
        "callee": "+15550002222",
        "agent": "test",
        "started": "2026-11-30T00:00:00+00:00",
    }
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in [header, *entries]))
    return path


def _start(t: float) -> dict[str, Any]:
    start = {"streamSid": "MZ1", "accountSid": "AC1", "callSid": SID, "tracks": ["inbound"]}
    start |= {"customParameters": {}, "mediaFormat": {"encoding": "audio/x-mulaw"}}
    return {"t": t, "kind": "in", "msg": {"event": "start", "sequenceNumber": "1", "start": start}}


def _caller(t: float, timestamp_ms: int, payload: bytes) -> dict[str, Any]:
    media = {"track": "inbound", "chunk": "1", "timestamp": str(timestamp_ms)}
    media["payload"] = base64.b64encode(payload).decode()
    return {"t": t, "kind": "in", "msg": {"event": "media", "streamSid": "MZ1", "media": media}}


def _agent(t: float, payload: bytes) -> dict[str, Any]:
    media = {"payload": base64.b64encode(payload).decode()}
    return {"t": t, "kind": "out", "msg": {"event": "media", "streamSid": "MZ1", "media": media}}


def _frames(t0: float, mulaw: bytes) -> list[dict[str, Any]]:
    """The caller's audio as Twilio streams it: 20 ms every 20 ms from t0 (stream at 0.5)."""
    return [
        _caller(t0 + i / 8000, int((t0 - 0.5) * 1000) + i // 8, mulaw[i : i + 160])
        for i in range(0, len(mulaw) - 159, 160)
    ]


def test_markers_sit_at_the_times_the_recording_says() -> None:
    path = CALLS / "early_barge_in.jsonl.gz"
    raw = _raw(path)[1:]
    origin = next(o["t"] for o in raw if o["kind"] == "in" and o["msg"]["event"] == "start")
    expected = {
        ("clear", round(o["t"] - origin, 4))
        for o in raw
        if o["kind"] == "out" and o["msg"]["event"] == "clear"
    }
    expected |= {
        ("interrupted", round(o["t"] - origin, 4)) for o in raw if o.get("event") == "interrupted"
    }
    expected |= {
        ("played", round(o["t"] - origin, 4))
        for o in raw
        if o["kind"] == "in" and o["msg"]["event"] == "mark"
    }
    report = build_report(load_recording(path))
    got = {(m.kind, round(m.t, 4)) for m in report.markers}
    assert expected <= got
    assert len(expected) > 80  # a clear, an interruption and every played mark
    assert ("stop", round(raw[-2]["t"] - origin, 4)) in got
    end = [m for m in report.markers if m.kind == "end"]
    assert [m.detail for m in end] == ["(caller hung up (stop))"]


def test_keys_are_markers_with_their_digits() -> None:
    report = build_report(load_recording(CALLS / "dtmf_mid_call.jsonl.gz"))
    keys = [m for m in report.markers if m.kind == "dtmf"]
    assert "".join(m.detail for m in keys) == "4207#"
    assert all(0.25 < b.t - a.t < 0.35 for a, b in zip(keys, keys[1:], strict=False))


def test_the_agent_pressing_keys_shows_where_the_stream_was_let_go(tmp_path: Path) -> None:
    """`send_dtmf`: the tool call, the stream let go for Twilio to play the keys, the new
    stream the call goes on over."""
    tool = {"t": 2.0, "kind": "model", "event": "tool_call", "name": "send_dtmf"}
    entries = [
        _start(0.5),
        tool | {"args": {"digits": "12#"}},
        {"t": 3.0, "kind": "call", "event": "released", "digits": "12#"},
        _start(4.5),
        {"t": 6.0, "kind": "end", "reason": "caller hung up (stop)"},
    ]
    report = build_report(load_recording(_write(tmp_path, entries)))
    shown = [(m.kind, m.detail) for m in report.markers if m.kind in ("released", "start")]
    assert shown == [("start", ""), ("released", "12#"), ("start", "")]
    [released] = [m for m in report.markers if m.kind == "released"]
    assert released.t == pytest.approx(2.5)  # from the first stream's start


def test_latency_runs_from_the_end_of_caller_speech_to_the_first_agent_audio(
    tmp_path: Path,
) -> None:
    speech = (FIXTURES / "hello.ulaw").read_bytes()
    speech = speech[: len(speech) - len(speech) % 160]
    pcm = np.frombuffer(mulaw_decode(speech), np.int16).astype(float).reshape(-1, 160)
    voiced = np.flatnonzero(np.sqrt((pcm**2).mean(axis=1)) > 100)  # espeak pads with silence
    spoken_end = 0.5 + 1.0 + (voiced[-1] + 1) * 0.02  # stream at 0.5, a second of silence first
    answer_at = spoken_end + 0.8
    tail = SILENCE * int((answer_at + 2 - spoken_end) / 0.02)
    entries = [_start(0.5), *_frames(0.5, SILENCE * 50 + speech + tail)]
    entries.append(_agent(answer_at, mulaw_encode(np.full(4000, 3000, "<i2").tobytes())))
    entries.sort(key=lambda e: e["t"])
    report = build_report(load_recording(_write(tmp_path, entries)))
    [response] = report.responses
    assert response.agent_start == pytest.approx(answer_at - 0.5, abs=1e-3)
    # the VAD ends speech at the end of its last speech frame
    assert response.caller_end == pytest.approx(spoken_end - 0.5, abs=0.041)
    assert response.latency == pytest.approx(answer_at - 0.5 - response.caller_end)


def test_the_agent_lane_is_what_the_caller_heard_cut_at_a_clear(tmp_path: Path) -> None:
    loud = mulaw_encode(np.full(8000, 4000, "<i2").tobytes())  # one second
    clear = {"t": 2.0, "kind": "out", "msg": {"event": "clear", "streamSid": "MZ1"}}
    entries = [_start(0.5), _agent(1.0, loud), _agent(1.1, loud), clear]
    said = mulaw_encode(np.full(160, -2000, "<i2").tobytes())
    entries += [_caller(2.5, 1900, said)]
    caller, agent = heard_audio(load_recording(_write(tmp_path, entries)))
    heard = np.flatnonzero(agent)
    assert (heard[0], heard[-1] + 1) == (4000, 12000)  # from 0.5 s to the clear at 1.5 s
    assert set(caller[np.flatnonzero(caller)]) == set(np.frombuffer(mulaw_decode(said), np.int16))
    assert (np.flatnonzero(caller)[0], len(np.flatnonzero(caller))) == (1900 * 8, 160)


def test_the_lanes_are_the_recorders_wav_even_across_a_second_stream(tmp_path: Path) -> None:
    """A second media stream (Twilio reconnected it, or the agent pressed keys) starts its
    timestamps at 0 again: its audio goes on from where it began, in the recorder's WAV as in
    the report's lanes."""
    now = [10.0]
    recorder = CallRecorder(
        tmp_path, call_sid=SID, caller="+1", callee="+2", agent="test", clock=lambda: now[0]
    )

    def stream(at: float, level: int, frames: int) -> None:
        now[0] = 10.0 + at
        recorder.twilio_in(Start(1, "MZ1", "AC1", SID, ("inbound",), {}))
        for k in range(frames):
            now[0] = 10.0 + at + k * 0.02 + 0.001
            frame = mulaw_encode(np.full(160, level, "<i2").tobytes())
            recorder.twilio_in(Media(2 + k, "MZ1", "inbound", 1 + k, 20 * k, frame))

    def agent(at: float, level: int) -> None:
        now[0] = 10.0 + at
        payload = base64.b64encode(mulaw_encode(np.full(2000, level, "<i2").tobytes())).decode()
        recorder.twilio_out(
            json.dumps({"event": "media", "streamSid": "MZ1", "media": {"payload": payload}})
        )

    stream(0.5, 1000, 50)
    agent(1.0, 3000)
    stream(3.0, -1000, 25)
    agent(3.25, -3000)
    now[0] = 14.0
    recorder.close("test")
    wav = np.frombuffer(recorder.wav_path.read_bytes()[44:], "<i2").reshape(-1, 2)
    caller, agent_lane = heard_audio(load_recording(recorder.path))
    assert np.array_equal(wav[:, 0], caller) and np.array_equal(wav[:, 1], agent_lane)
    loud = np.flatnonzero(caller < 0)
    assert (loud[0], loud[-1] + 1) == (2.5 * 8000, 3.0 * 8000)  # 0.5 s of it, 2.5 s in
    assert (np.flatnonzero(caller > 0)[[0, -1]] + [0, 1]).tolist() == [0, 8000]
    assert np.flatnonzero(agent_lane < 0)[0] == 2.75 * 8000


def test_peaks_are_each_columns_extremes() -> None:
    samples = np.array([0, 100, -200, 50, 16384, -16384, 0, 0], np.int16)
    assert peaks(samples, 4).tolist() == [
        [0.0, 100 / 32768],
        [-200 / 32768, 50 / 32768],
        [-0.5, 0.5],
        [0.0, 0.0],
    ]
    assert peaks(np.array([32767], np.int16), 3).shape == (3, 2)  # fewer samples than columns
    assert peaks(np.zeros(0, np.int16), 5).tolist() == [[0.0, 0.0]] * 5


def test_an_agent_line_shows_what_the_caller_never_heard(tmp_path: Path) -> None:
    said = {"t": 1.2, "kind": "model", "event": "output_transcription"}
    entries = [
        _start(0.0),
        {**said, "text": "one two ", "finished": False},
        {**said, "t": 1.3, "text": "three four", "finished": False},
        {**said, "t": 1.6, "text": "one two three four", "finished": True},
        {"t": 2.0, "kind": "call", "event": "heard", "heard": "one two", "unheard": "three four"},
    ]
    report = build_report(load_recording(_write(tmp_path, entries)))
    [line] = report.lines
    assert (line.t, line.who, line.heard, line.unheard) == (1.2, "agent", "one two", "three four")
    page = render(report)
    assert re.search(r"one two <s class=\"unheard\"[^>]*>three four</s>", page)


def test_a_replayed_barge_in_is_recorded_and_reported() -> None:
    """The bridge's decisions land in the recording (hold, barge-in, the heard-note) and the
    report shows them where they happened."""
    result = replay_in_process(CALLS / "late_barge_in.jsonl.gz")
    assert result.recording is not None
    calls = [(e.data["event"], e.t) for e in result.recording.entries if e.kind == "call"]
    assert [name for name, _ in calls] == ["hold", "barge_in", "heard"]
    origin = result.recording.stream_start or 0.0
    report = build_report(result.recording)
    barge_in = [m for m in report.markers if m.kind == "barge_in"]
    assert [round(m.t, 4) for m in barge_in] == [round(calls[1][1] - origin, 4)]
    assert barge_in[0].detail == "(caller speech)"
    [cut] = [line for line in report.lines if line.unheard]
    assert cut.who == "agent" and cut.text.endswith(cut.unheard)


def test_reconnects_and_restarts_are_told_apart(tmp_path: Path) -> None:
    entries = [
        _start(0.0),
        {"t": 1.0, "kind": "call", "event": "reconnect", "restarts": 0, "reconnects": 1},
        {"t": 2.0, "kind": "call", "event": "reconnect", "restarts": 1, "reconnects": 2},
        {"t": 3.0, "kind": "call", "event": "some_later_event"},
        {"t": 3.5, "kind": "model", "event": "tool_call", "name": "end_call", "args": {}},
    ]
    report = build_report(load_recording(_write(tmp_path, entries)))
    kinds = [(m.kind, m.t) for m in report.markers if m.kind != "start"]
    assert kinds == [("reconnect", 1.0), ("restart", 2.0), ("tool_call", 3.5)]


def test_a_calls_new_live_connections_are_recorded(tmp_path: Path) -> None:
    """ADK's reconnect and the supervisor's restart both reach the call as a reopened
    connection; the recording says which, by the restarts counted so far."""

    async def main() -> Path:
        runner = Runner(app=echo_app(), session_service=InMemorySessionService())
        call = Call(
            CallInfo(SID, "+1", "+2"),
            runner=runner,
            run_config=RunConfig(),
            options=CallOptions(record_dir=tmp_path),
        )
        assert call.recorder is not None
        call._on_reconnect()
        call.live.restarts = 1
        call._on_reconnect()
        call.recorder.close("test")
        return call.recorder.path

    recording = load_recording(run_virtual(main()))
    [first, second] = [e.data for e in recording.entries if e.kind == "call"]
    assert (first["event"], first["restarts"], second["restarts"]) == ("reconnect", 0, 1)
    report = build_report(recording)
    assert [m.kind for m in report.markers if m.kind != "end"] == ["reconnect", "restart"]


@pytest.mark.parametrize("path", sorted(CALLS.glob("*.jsonl.gz")), ids=lambda p: p.name)
def test_every_recorded_call_reports_and_its_audio_survives_the_page(path: Path) -> None:
    """Recordings made before the report existed still load; the page's audio decodes back to
    the lanes (mu-law is what the line carried: nothing is lost)."""
    report = build_report(load_recording(path))
    page = render(report)
    payload = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page)
    assert payload is not None
    data = json.loads(payload.group(1))
    assert data["duration"] == report.duration
    for name, lane in (("caller", report.caller), ("agent", report.agent)):
        rebuilt = np.zeros(len(lane), np.int16)
        for start, text in data["lanes"][name]:
            pcm = np.frombuffer(mulaw_decode(base64.b64decode(text)), np.int16)
            rebuilt[start : start + len(pcm)] = pcm
        assert np.array_equal(rebuilt, lane)
    assert np.any(report.agent)
    # at most both lanes' mu-law in base64 (21.3 kB/s) and the marks: under 3 MB for 2 minutes
    assert len(page) < 24_000 * report.duration + 50_000


def test_a_recording_cut_short_still_reports(tmp_path: Path) -> None:
    text = gzip.decompress((CALLS / "one_turn.jsonl.gz").read_bytes()).decode()
    path = tmp_path / "cut.jsonl"
    path.write_text(text[: len(text) // 2])
    report = build_report(load_recording(path))
    assert report.truncated and report.end_reason is None
    assert "cut short" in render(report)


def test_the_command_writes_the_page_for_a_file_or_a_call_sid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TELEPHONY_RECORD_DIR", raising=False)
    (tmp_path / "rec").mkdir()
    recording = tmp_path / "rec" / f"{SID}.jsonl.gz"
    recording.write_bytes((CALLS / "one_turn.jsonl.gz").read_bytes())
    sid = load_recording(recording).header["call_sid"]

    assert main(["report", str(recording), "-o", "out.html"]) == 0
    assert (tmp_path / "out.html").read_text().startswith("<!DOCTYPE html>")
    assert main(["report", SID, "--record-dir", str(tmp_path / "rec")]) == 0
    assert (tmp_path / f"{sid}.html").exists()  # named after the call the recording holds
    monkeypatch.setenv("TELEPHONY_RECORD_DIR", str(tmp_path / "rec"))
    assert main(["report", SID, "-o", "env.html"]) == 0
    assert capsys.readouterr().out.split() == ["out.html", f"{sid}.html", "env.html"]

    assert main(["report", "CAnothere"]) == 2
    assert "no recording of that call in" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"not": "a recording"}\n')
    assert main(["report", "bad.jsonl"]) == 2
    assert "not a telephony-call recording" in capsys.readouterr().err
    assert main(["report", str(recording), "-o", str(tmp_path / "no" / "such" / "dir.html")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_write_report_defaults_to_the_call_sid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_report(str(CALLS / "dtmf_mid_call.jsonl.gz"), None, None)
    assert path.name == "CA47c1a9479f091ed6e68d3596e90ce7ae.html"
