"""Reconnects on the path production runs (the real server, ADK's Gemini, google-genai, TLS,
the Gemini Live stand-in): the model's session survives a go_away or a drop mid-reply with its
context, the caller's question is answered after any reconnect, and a service that keeps
dropping the connection ends the call with an apology instead of a reconnect storm."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from google.adk.agents.run_config import RunConfig

from telephony import agents
from telephony.call import asset
from telephony.settings import Settings
from telephony.testing.gemini_live import FaultPlan, GeminiLiveService

from .audio_tools import best_correlation, pcm, speech_core, speech_span_s
from .server import (
    RunningServer,
    calls_ended,
    rise,
    running_server,
    sample,
    say,
    scrape,
    scrape_idle,
    wait_until,
)
from .test_realpath import (
    _answered_across_a_reconnect,
    _call,
    _connections,
    _echo_score,
    _greeted,
    _hang_up,
    _heard_after,
    _heard_between,
    _resumed,
)
from .test_realpath import gemini as gemini  # the module fixtures, shared
from .test_realpath import server as server


@pytest.fixture(scope="module")
def unresumable_server(
    gemini: GeminiLiveService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """The built-in agent without session resumption: no handle, so a drop ends run_live."""
    phone_run_config = agents.phone_run_config

    def without_resumption(settings: Settings) -> RunConfig:
        return phone_run_config(settings).model_copy(update={"session_resumption": None})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(agents, "phone_run_config", without_resumption)
        with running_server(tmp_path_factory.mktemp("unresumable"), agent="") as running:
            yield running


def _metric(server: RunningServer, name: str) -> float:
    return sample(scrape(server.base_url), name)


async def test_a_drop_mid_reply_resumes_the_session_and_answers(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    connections = await _answered_across_a_reconnect(
        server, gemini, FaultPlan.drop(after_turns=1, chunks=10)
    )
    assert connections[0].close_code == 1006
    _resumed(connections)


CORE_START = 2400
"""Where `_core` starts in its fixture (samples)."""


async def test_after_a_go_away_mid_reply_the_answer_follows_within_a_second(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    first = len(gemini.connections)
    gemini.plan(FaultPlan.go_away(after_turns=1, chunks=10, time_left_s=0.5))
    async with _call(server) as sim:
        await _greeted(sim)
        _, end = await say(sim, "sunday")
        await wait_until(lambda: len(gemini.connections) == first + 2, 5, "the reconnect")
        reconnected = gemini.connections[-1].opened_at
        await wait_until(lambda: _heard_after(sim, reconnected), 3, "the answer")
        await sim.agent_quiet(0.8)
        heard = sim.log.heard_pcm()[int((end - sim.log.started) * 8000) :]
        score, offset = best_correlation(heard, speech_core("sunday"))
        assert score > 0.9
        await _hang_up(server, sim)
    answered = end + (offset - CORE_START) / 8000  # where the repeated answer began
    print(f"go_away mid-reply: the answer began {answered - reconnected:.2f} s after it")
    assert 0 < answered - reconnected < 1.0


async def test_a_drop_without_any_handle_restarts_and_the_question_is_answered(
    unresumable_server: RunningServer, gemini: GeminiLiveService
) -> None:
    connections = await _answered_across_a_reconnect(
        unresumable_server, gemini, FaultPlan.drop(after_turns=1, chunks=10)
    )
    assert len(connections) == 2
    old, new = connections
    assert old.resumed_handle is None and new.resumed_handle is None
    assert old.text_turns[0] in new.text_turns  # the call so far came back as history


async def test_a_service_that_accepts_then_drops_gets_an_apology_and_few_connections(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    first = len(gemini.connections)
    start = await scrape_idle(server)
    gemini.always(FaultPlan.drop())
    try:
        started = time.monotonic()
        async with _call(server) as sim:
            await asyncio.wait_for(sim.closed.wait(), 10)
            ended = time.monotonic() - started
            heard = sim.log.heard_pcm()
    finally:
        gemini.always(None)
    opened = [c for c in _connections(gemini, first) if c.opened_at - started <= 10]
    print(f"accept-then-drop: {len(opened)} connections, call ended after {ended:.1f} s")
    assert len(opened) <= 8
    apology = pcm(asset("apology"))
    assert best_correlation(heard, apology)[0] > 0.9
    end = await scrape_idle(server)
    assert rise(start, end, "telephony_model_reconnects_total") >= 3  # each reconnect and restart
    assert calls_ended(start, end, "model_failed") == 1


async def test_after_a_go_away_mid_reply_the_answer_is_heard_once(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    """The new connection answers from the start: what was left of the cut-off reply is
    dropped, so the caller hears at most what had already reached them, then one answer."""
    gemini.plan(FaultPlan.go_away(after_turns=1, chunks=10, time_left_s=0.5))
    async with _call(server) as sim:
        await _greeted(sim)
        _, end = await say(sim, "sunday")
        await wait_until(lambda: _heard_after(sim, end), 6, "the answer")
        await sim.agent_quiet(1.0)
        heard = _heard_between(sim, end, time.monotonic())
        await _hang_up(server, sim)
    speech_start, speech_end = speech_span_s("sunday")
    assert heard <= speech_end - speech_start + 0.35


@pytest.fixture(scope="module")
def impatient_server(
    gemini: GeminiLiveService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """Restarts a model silent for 2 s, once in a row; no greeting, so only the caller asks."""
    with running_server(
        tmp_path_factory.mktemp("impatient"),
        agent="",
        model_stall_s=2.0,
        model_restarts=1,
        greeting="",
    ) as running:
        yield running


async def test_a_model_that_never_answers_ends_in_the_apology(
    impatient_server: RunningServer, gemini: GeminiLiveService
) -> None:
    """Every session transcribes the caller and says nothing: it is restarted once, then the
    caller hears the apology, instead of restarts for ever (a stalled session still sends
    resumption updates and transcripts, which must not count as the model working)."""
    first = len(gemini.connections)
    gemini.always(FaultPlan.stall())
    try:
        async with _call(impatient_server) as sim:
            await asyncio.sleep(0.5)
            await say(sim, "sunday")
            await asyncio.wait_for(sim.closed.wait(), 15)
            heard = sim.log.heard_pcm()
    finally:
        gemini.always(None)
    assert len(_connections(gemini, first)) == 2
    assert best_correlation(heard, pcm(asset("apology")))[0] > 0.9


async def test_what_the_caller_says_while_the_model_is_away_reaches_it_when_it_is_back(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    """A go_away when idle, and the new connection takes 8 s to set up: meanwhile caller audio
    waits, and only 5 s of it fit. The question the caller asks at the end of the outage is
    kept (the silence before it makes room), so it is answered once the model is back."""
    first = len(gemini.connections)
    gemini.plan(FaultPlan.go_away(after_turns=1, time_left_s=0.2), FaultPlan.slow_setup(8.0))
    async with _call(server) as sim:
        await _greeted(sim)
        await wait_until(lambda: len(gemini.connections) == first + 2, 5, "the reconnect")
        await asyncio.sleep(5.5)
        _, end = await say(sim, "sunday")
        await wait_until(lambda: _heard_after(sim, end), 6, "the answer")
        await sim.agent_quiet(0.8)
        assert _echo_score(sim, end, "sunday") > 0.9
        await _hang_up(server, sim)
    dropped = await asyncio.to_thread(
        _metric, server, "telephony_caller_audio_dropped_seconds_total"
    )
    assert dropped > 0  # the outage did overflow


async def test_a_restart_brings_back_what_the_caller_did_not_hear(
    unresumable_server: RunningServer, gemini: GeminiLiveService
) -> None:
    """The caller cuts a reply off; later the connection drops and, with no handle, the new
    one is given the call's history: the note of what the caller heard is in it."""
    first = len(gemini.connections)
    gemini.plan(FaultPlan.drop(after_turns=3))  # the greeting, the cut reply, the next answer
    async with _call(unresumable_server) as sim:
        await _greeted(sim)
        _, end = await say(sim, "hello")
        await wait_until(lambda: _heard_after(sim, end), 3, "the answer")
        await asyncio.sleep(1.0)
        _, barge_end = await say(sim, "stop")
        await wait_until(lambda: _heard_after(sim, barge_end), 4, "the answer to the barge-in")
        await wait_until(lambda: len(gemini.connections) == first + 2, 8, "the restart")
        await _hang_up(unresumable_server, sim)
    old, new = _connections(gemini, first)
    [note] = [t for t in old.text_turns if t.startswith("(The caller interrupted you")]
    assert note in new.text_turns  # sent again as history
