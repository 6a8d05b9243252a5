"""Replay a recorded call's caller side against an agent and compare how the agent side went.

The caller's messages (audio, DTMF, hang-up) are sent with their original timing; the
Twilio side is the simulator (playout at 8,000 bytes/s, marks echoed, `clear` honoured).
Both calls are then reduced to the same `CallFigures` (caller speech, agent turns, response
latencies, clears, marks, transcripts, how it ended) and compared with tolerances.

In-process replays (`replay_in_process`, or the `call_replay` pytest fixture) run the real
app on a virtual clock: deterministic, and much faster than real time. `replay(url=...)`
plays against a running server in real time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..agents import AgentSpec
from ..call import CALL_TASKS
from ..call.recording import Recording, load_recording
from ..call.timeline import agent_turns, caller_speech, playout, responses
from .simulator import CallerSimulator, CallLog, place_call
from .virtual_clock import run_virtual

__all__ = [
    "CallFigures",
    "ReplayResult",
    "ScriptStep",
    "caller_script",
    "compare",
    "figures_from_log",
    "figures_from_recording",
    "replay",
    "replay_in_process",
]

DROPPED = "media stream closed"
"""How the bridge names a call whose socket closed without `stop`."""


@dataclass(frozen=True)
class ScriptStep:
    """One caller action, `t` seconds after the media stream started."""

    t: float
    event: str
    payload: bytes = b""
    digit: str = ""


def caller_script(recording: Recording) -> list[ScriptStep]:
    start = recording.stream_start
    if start is None:
        return []
    steps: list[ScriptStep] = []
    for t, msg in recording.twilio_in():
        event = msg["event"]
        if event == "media":
            payload = base64.b64decode(msg["media"]["payload"])
            steps.append(ScriptStep(t - start, "media", payload=payload))
        elif event == "dtmf":
            steps.append(ScriptStep(t - start, "dtmf", digit=msg["dtmf"]["digit"]))
        elif event == "stop":
            steps.append(ScriptStep(t - start, "stop"))
    return steps


@dataclass
class CallFigures:
    """One call reduced to what matters to a caller; times in seconds from stream start."""

    caller_speech: list[tuple[float, float]] = field(default_factory=list)
    agent_turns: list[tuple[float, float]] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    marks_sent: int = 0
    marks_echoed: int = 0
    end_reason: str | None = None
    caller_transcripts: list[str] | None = None
    agent_transcripts: list[str] | None = None
    interruptions: int | None = None
    """How often the model reported `interrupted` (None: not known from the Twilio side)."""

    @property
    def response_latencies(self) -> list[float]:
        """For each agent turn that answers caller speech: turn start minus the end of the
        speech just before it."""
        return [start - end for end, start in responses(self.caller_speech, self.agent_turns)]


def figures_from_recording(recording: Recording) -> CallFigures:
    start = recording.stream_start or 0.0
    frames: list[tuple[float, bytes]] = []
    marks_echoed = 0
    for t, msg in recording.twilio_in():
        if msg["event"] == "media":
            frames.append((t - start, base64.b64decode(msg["media"]["payload"])))
        elif msg["event"] == "mark":
            marks_echoed += 1
    sent: list[tuple[float, int]] = []
    clears: list[float] = []
    marks_sent = 0
    for t, msg in recording.twilio_out():
        if msg["event"] == "media":
            sent.append((max(0.0, t - start), len(base64.b64decode(msg["media"]["payload"]))))
        elif msg["event"] == "clear":
            clears.append(t - start)
        elif msg["event"] == "mark":
            marks_sent += 1
    return CallFigures(
        caller_speech=caller_speech(frames),
        agent_turns=agent_turns(playout(sent, clears)),
        clears=clears,
        marks_sent=marks_sent,
        marks_echoed=marks_echoed,
        end_reason=recording.end_reason,
        caller_transcripts=recording.transcripts("input"),
        agent_transcripts=recording.transcripts("output"),
        interruptions=len(recording.model("interrupted")),
    )


def figures_from_log(log: CallLog) -> CallFigures:
    """The Twilio side's view of a call (what a replay against a remote server can see)."""
    frames = [(t - log.started, payload) for t, payload in log.sent]
    return CallFigures(
        caller_speech=caller_speech(frames),
        agent_turns=agent_turns([(h.start - log.started, h.end - log.started) for h in log.heard]),
        clears=[t - log.started for t in log.clears],
        marks_sent=log.marks_received,
        marks_echoed=log.marks_echoed,
    )


def compare(expected: CallFigures, actual: CallFigures, *, tolerance_s: float = 0.3) -> list[str]:
    """Differences that matter, as sentences (empty: the calls went the same way)."""
    problems: list[str] = []

    def times(name: str, a: list[float], b: list[float]) -> None:
        if len(a) != len(b):
            problems.append(f"{name}: expected {len(a)} at {_fmt(a)}, got {len(b)} at {_fmt(b)}")
            return
        for x, y in zip(a, b, strict=True):
            if abs(x - y) > tolerance_s:
                problems.append(f"{name}: expected at {x:.2f} s, got {y:.2f} s")

    times("clears", expected.clears, actual.clears)
    times("agent turns", [s for s, _ in expected.agent_turns], [s for s, _ in actual.agent_turns])
    for name in ("caller_transcripts", "agent_transcripts", "end_reason", "interruptions"):
        want, got = getattr(expected, name), getattr(actual, name)
        if want is not None and got is not None and want != got:
            problems.append(f"{name.replace('_', ' ')}: expected {want!r}, got {got!r}")
    return problems


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"


@dataclass
class ReplayResult:
    original: CallFigures
    figures: CallFigures
    """The replayed call: from the server's own recording when there is one, else from the
    Twilio side."""
    log: CallLog
    recording: Recording | None
    leftover_tasks: list[str] | None = None
    """In-process replays: the per-call tasks still alive once the call was over (should be
    none: every call ends everything it owns)."""

    def differences(self, tolerance_s: float = 0.3) -> list[str]:
        return compare(self.original, self.figures, tolerance_s=tolerance_s)


async def _play(sim: CallerSimulator, script: list[ScriptStep], original: Recording) -> None:
    loop = asyncio.get_running_loop()
    for step in script:
        delay = sim.log.started + step.t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if step.event == "media":
            await sim.send_frame(step.payload)
        elif step.event == "dtmf":
            await sim.press(step.digit)
        elif step.event == "stop":
            await sim.hang_up()
            return
    if original.end_reason == DROPPED:
        await sim.close()
        return
    # The server ended the original call: give it the time it took then, and a little more.
    start = original.stream_start or 0.0
    last = max((e.t for e in original.entries), default=start) - start
    with contextlib.suppress(TimeoutError):
        remaining = sim.log.started + last - loop.time()
        async with asyncio.timeout(max(0.0, remaining) + 5):
            await sim.closed.wait()


async def replay(
    recording: Recording | str | Path,
    *,
    app: Any = None,
    url: str = "",
    auth_token: str = "",
    public_url: str = "",
    record_dir: Path | None = None,
) -> ReplayResult:
    """Plays `recording`'s caller side into a started Quart `app` or a server at `url`.

    With `record_dir` (the server's recording folder), the replay's figures come from the
    server's recording of it, transcripts included."""
    original = recording if isinstance(recording, Recording) else load_recording(recording)
    script = caller_script(original)
    sid = "CA" + uuid.uuid4().hex
    async with place_call(
        url,
        app=app,
        auth_token=auth_token,
        public_url=public_url,
        call_sid=sid,
        caller=str(original.header.get("caller", "")),
        callee=str(original.header.get("callee", "")),
        continuous=False,
    ) as sim:
        await _play(sim, script, original)
    replayed: Recording | None = None
    if record_dir is not None:
        path = record_dir / f"{sid}.jsonl"
        for _ in range(100):  # the server finishes the recording as the call winds down
            if path.exists() and (replayed := load_recording(path)).end_reason is not None:
                break
            await asyncio.sleep(0.1)
    figures = (
        figures_from_recording(replayed) if replayed is not None else figures_from_log(sim.log)
    )
    return ReplayResult(figures_from_recording(original), figures, sim.log, replayed)


def replay_in_process(
    recording: Recording | str | Path, agent: str | AgentSpec = "echo", **settings: Any
) -> ReplayResult:
    """Replays against a fresh in-process server on a virtual clock: deterministic, and as
    fast as the CPU allows. `agent` is `echo`, an agent folder, or an `AgentSpec` (your own
    app, e.g. with a scripted model); `settings` override `Settings` fields. Agents that do
    their work in threads (or real network models) need `replay(url=...)` in real time."""
    from ..server.app import create_app
    from ..settings import Settings

    async def main(record_dir: Path) -> ReplayResult:
        name = agent if isinstance(agent, str) else "custom"
        config = Settings(agent=name, session_db="", record_dir=str(record_dir), **settings)
        app = create_app(config, agent if isinstance(agent, AgentSpec) else None)
        async with app.test_app():
            result = await replay(recording, app=app, record_dir=record_dir)
            await app.extensions["telephony.calls"].wait_idle(10.0)
            await asyncio.sleep(0)
            result.leftover_tasks = [
                t.get_name()
                for t in asyncio.all_tasks()
                if t.get_name().split("-")[0] in CALL_TASKS
            ]
            return result

    with tempfile.TemporaryDirectory(prefix="telephony-replay-") as tmp:
        return run_virtual(main(Path(tmp)))
