"""Calls that survive the live model failing: drops, go_away, restarts, stalls, slow answers.

Each test runs a real call in-process on a virtual clock against the echo model with faults
switched on (`EchoFaults`), and reads the server's recording of it."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from telephony.agents import AgentSpec, phone_run_config
from telephony.agents.echo import EchoConnection, EchoFaults, EchoLlm, echo_app
from telephony.call import asset
from telephony.call.recording import Recording, load_recording
from telephony.server.app import create_app
from telephony.settings import Settings
from telephony.testing.replay import CallFigures, figures_from_recording
from telephony.testing.simulator import CallerSimulator, CallLog, place_call
from telephony.testing.virtual_clock import run_virtual

from .audio_tools import best_correlation, fixture, pcm

SID = "CA" + "7" * 32


@dataclass
class Outcome:
    figures: CallFigures
    recording: Recording
    log: CallLog
    connections: list[EchoConnection]
    calls_left: int


def run_call(
    tmp: Path, faults: EchoFaults, script: Callable[[CallerSimulator], Awaitable[None]]
) -> Outcome:
    async def main() -> Outcome:
        settings = Settings(agent="echo", session_db="", record_dir=str(tmp))
        app_ = echo_app(faults=faults, keep_connections=True)
        app = create_app(settings, AgentSpec(app_, phone_run_config(settings), None))
        async with app.test_app():
            async with place_call(app=app, call_sid=SID) as sim:
                await script(sim)
            calls = app.extensions["telephony.calls"]
            await calls.wait_idle(10.0)
            model = app_.root_agent.model
            assert isinstance(model, EchoLlm)
            recording = load_recording(tmp / f"{SID}.jsonl")
            return Outcome(
                figures_from_recording(recording), recording, sim.log, model.connections, len(calls)
            )

    return run_virtual(main())


async def two_utterances(sim: CallerSimulator) -> None:
    await asyncio.sleep(1.0)
    await sim.say(fixture("hello"))  # 1.0-5.1 s, echoed from about 5.7 s
    await asyncio.sleep(9.0)
    await sim.say(fixture("stop"))  # 10-12.9 s, echoed from about 13.5 s
    await sim.finish_speaking()
    await asyncio.sleep(5.0)
    await sim.hang_up()


def assert_both_answered(outcome: Outcome) -> None:
    f = outcome.figures
    assert len(f.caller_speech) == 2
    assert len(f.response_latencies) == 2
    assert all(latency < 1.0 for latency in f.response_latencies)
    assert f.end_reason == "caller hung up (stop)"
    assert outcome.calls_left == 0
    heard = outcome.log.heard_pcm()
    assert best_correlation(heard, pcm(fixture("stop"))[2400:-4000])[0] > 0.9


def test_a_dropped_model_connection_is_resumed(tmp_path: Path) -> None:
    """Gemini drops the connection mid-call; ADK reconnects with the resumption handle."""
    outcome = run_call(tmp_path, EchoFaults(drop_after_s=8.0), two_utterances)
    assert_both_answered(outcome)
    assert len(outcome.connections) >= 2 and outcome.connections[1].resumed


def test_go_away_is_absorbed(tmp_path: Path) -> None:
    outcome = run_call(tmp_path, EchoFaults(go_away_after_s=8.0), two_utterances)
    assert_both_answered(outcome)
    assert len(outcome.connections) >= 2 and outcome.connections[1].resumed


def test_without_a_handle_the_bridge_restarts_run_live_with_the_history(tmp_path: Path) -> None:
    outcome = run_call(tmp_path, EchoFaults(drop_after_s=8.0, resumable=False), two_utterances)
    assert_both_answered(outcome)
    second = outcome.connections[1]
    assert not second.resumed
    said = " ".join(part.text or "" for content in second.history for part in content.parts or [])
    assert "(caller spoke for 4.0 s)" in said  # the call so far came back as history


def test_a_model_that_never_comes_back_gets_an_apology_and_a_clean_hang_up(
    tmp_path: Path,
) -> None:
    async def wait(sim: CallerSimulator) -> None:
        await asyncio.wait_for(sim.closed.wait(), 30)

    outcome = run_call(tmp_path, EchoFaults(fail_connects=100), wait)
    assert outcome.figures.end_reason == "live session failed"
    assert outcome.calls_left == 0
    heard = outcome.log.heard_pcm()
    apology = pcm(asset("apology"))
    assert len(heard) >= len(apology)  # all of it played before the hang-up
    assert best_correlation(heard, apology)[0] > 0.95
    assert outcome.connections == []


def test_a_stalled_model_is_restarted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The model goes silent 3 s in; after the caller's unanswered question it is restarted
    and the caller's next question is answered. Meanwhile caller audio is not piled up."""
    caplog.set_level(logging.INFO, logger="telephony")

    async def script(sim: CallerSimulator) -> None:
        await asyncio.sleep(4.0)
        await sim.say(fixture("hello"))  # unanswered: the model stalled
        await asyncio.sleep(22.0)
        await sim.say(fixture("stop"))
        await sim.finish_speaking()
        await asyncio.sleep(5.0)
        await sim.hang_up()

    outcome = run_call(tmp_path, EchoFaults(stall_after_s=3.0, faulty_connections=1), script)
    assert len(outcome.connections) == 2
    f = outcome.figures
    assert len(f.caller_speech) == 2
    latencies = f.response_latencies
    assert len(latencies) == 1 and latencies[0] < 1.0  # the second question was answered
    assert "the model is not reading: dropping the oldest caller audio" in caplog.text
    assert "the model reads caller audio again" in caplog.text
    # stalled at 3 s, 5 s of backlog kept, restarted at 23.7 s: the rest was dropped (to
    # within the 200 ms batches caller audio goes to the model in)
    found = re.search(r"dropped: caller audio ([\d.]+) s", caplog.text)
    assert found is not None and 15.3 <= float(found[1]) <= 15.5


def test_slow_answers_still_arrive(tmp_path: Path) -> None:
    outcome = run_call(tmp_path, EchoFaults(reply_delay_s=2.0), two_utterances)
    latencies = outcome.figures.response_latencies
    assert len(latencies) == 2 and all(2.4 < x < 3.0 for x in latencies)
    assert np.isclose(latencies[0], latencies[1], atol=0.05)
