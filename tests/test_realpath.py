"""The path production runs, end to end: the Twilio-side simulator with real speech -> the
real server -> the built-in agent (ADK's `Gemini` -> google-genai's live client -> TLS) -> the
Gemini Live stand-in, which decides turns with its own VAD and records what it was told.

Scenarios that expose a defect the next issue fixes assert the correct behaviour and are marked
expected-to-fail (strict), naming the defect, so the fix flips them.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.adk.sessions import Session
from websockets.asyncio.client import connect

from telephony.call import asset
from telephony.call.supervisor import NOTE_METADATA_KEY
from telephony.call.turns import IDLE_PROMPT, WRAP_UP_PROMPT
from telephony.testing.gemini_live import (
    ConnectionRecord,
    FaultPlan,
    GeminiLiveService,
    running_in_thread,
)
from telephony.testing.simulator import (
    CallerSimulator,
    Echo,
    Interjection,
    Network,
    place_call,
)

from .audio_tools import best_correlation, fixture, pcm, speech_core, speech_span_s
from .server import RunningServer, calls_ended, running_server, say, scrape_idle, wait_until

AGENTS = Path(__file__).parent / "agents"
STALL_S = 4.0
"""The servers here restart a live session the caller has waited this long for (default 15)."""


@pytest.fixture(scope="module")
def gemini() -> Iterator[GeminiLiveService]:
    """One stand-in for the module; google-genai finds it through the environment."""
    with running_in_thread() as service, pytest.MonkeyPatch.context() as env:
        for name, value in service.environ().items():
            env.setenv(name, value)
        yield service


@pytest.fixture(scope="module")
def server(
    gemini: GeminiLiveService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """`telephony serve` with the built-in agent on the default model (gemini-3.8-live)."""
    with running_server(
        tmp_path_factory.mktemp("realpath"), agent="", model_stall_s=STALL_S
    ) as running:
        yield running


@pytest.fixture(scope="module")
def tool_server(
    gemini: GeminiLiveService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """A user's agent folder with a tool, on a 2.5 native-audio model."""
    with running_server(
        tmp_path_factory.mktemp("realpath-tools"), agent=str(AGENTS / "opening_hours")
    ) as running:
        yield running


_sids = iter(range(1, 10**6))


def _call(server: RunningServer, **kwargs: object):  # type: ignore[no-untyped-def]
    return place_call(server.base_url, call_sid=f"CA{next(_sids):032d}", **kwargs)  # type: ignore[arg-type]


def _heard_after(sim: CallerSimulator, t: float) -> list[float]:
    """When each piece of agent audio the caller heard after `t` started."""
    return [h.start for h in sim.log.heard if h.start > t]


async def _greeted(sim: CallerSimulator) -> None:
    """Waits for the greeting and for it to finish playing."""
    await wait_until(lambda: sim.log.heard, 5, "the greeting")
    await sim.agent_quiet(0.6)


def _echo_score(sim: CallerSimulator, after: float, name: str) -> float:
    heard = sim.log.heard_pcm()[int((after - sim.log.started) * 8000) :]
    return best_correlation(heard, speech_core(name))[0]


def _heard_between(sim: CallerSimulator, start: float, end: float) -> float:
    """Seconds of agent audio the caller heard between two moments."""
    return sum(max(0.0, min(h.end, end) - max(h.start, start)) for h in sim.log.heard)


def _sent(connection: ConnectionRecord, kind: str) -> int:
    """Frames the stand-in sent that carried `kind` (e.g. "interrupted", "goAway")."""
    return sum(kind in sent.split("+") for sent in connection.sent)


def _underruns(sim: CallerSimulator, start: float, end: float) -> list[float]:
    """Silences inside agent speech the caller heard between two moments: gaps of 20 ms to
    300 ms between pieces of agent audio (longer ones are between replies)."""
    pieces = sorted((h.start, h.end) for h in sim.log.heard if start <= h.start < end)
    return [
        round(b_start - a_end, 3)
        for (_, a_end), (b_start, _) in zip(pieces, pieces[1:], strict=False)
        if 0.02 < b_start - a_end < 0.3
    ]


def _connections(gemini: GeminiLiveService, since: int) -> list[ConnectionRecord]:
    return gemini.connections[since:]


async def _hang_up(server: RunningServer, sim: CallerSimulator) -> None:
    sid = sim.call_sid
    await sim.hang_up()
    await wait_until(lambda: server.calls.get(sid) is None, 5, "the call to end")
    await wait_until(
        lambda: not [n for n in server.call_tasks() if n.endswith(sid)], 5, "call tasks to end"
    )


async def test_greeting_and_two_turns(server: RunningServer, gemini: GeminiLiveService) -> None:
    first = len(gemini.connections)
    async with _call(server) as sim:
        await _greeted(sim)
        assert sim.log.heard[0].start - sim.log.started < 1.5
        for name in ("sunday", "time"):
            _, end = await say(sim, name)
            await wait_until(lambda e=end: _heard_after(sim, e), 3, f"the answer to {name}")
            await sim.agent_quiet(0.6)
            assert _echo_score(sim, end, name) > 0.9
        assert not sim.log.clears
        await _hang_up(server, sim)
    [connection] = _connections(gemini, first)
    assert connection.model == "models/gemini-3.8-live"
    assert connection.text_turns == [
        "(The phone call has just connected. Greet the caller briefly.)"
    ]
    assert [t.role for t in connection.context] == ["user", "model"] * 3
    assert _sent(connection, "interrupted") == 0


@pytest.mark.parametrize(
    ("into_reply_s", "model_generating", "echo"),
    [(0.25, True, None), (2.0, False, None), (0.25, True, Echo(level_db=-25.0, delay_s=0.15))],
)
async def test_barge_in(
    server: RunningServer,
    gemini: GeminiLiveService,
    into_reply_s: float,
    model_generating: bool,
    echo: Echo | None,
) -> None:
    """Early (the model is still generating: it reports the interruption too) and late (it has
    finished: only our VAD can tell). Either way Twilio is cleared within 300 ms of onset, the
    caller hears at most 350 ms of agent audio after it, and then the answer to what they said.
    Through a handset's echo too: the model hears the caller over the agent at once, and whole
    (its answer repeats them)."""
    first = len(gemini.connections)
    async with _call(server, echo=echo) as sim:
        await _greeted(sim)
        _, end = await say(sim, "hello")
        await wait_until(lambda: _heard_after(sim, end), 3, "the answer")
        reply = _heard_after(sim, end)[0]
        await asyncio.sleep(reply + into_reply_s - time.monotonic())
        onset, barge_end = await say(sim, "stop")
        await wait_until(lambda: sim.log.clears, 1, "a clear")
        after_onset = _heard_between(sim, onset, barge_end)
        print(
            f"barge-in {into_reply_s} s into the reply: cleared {sim.log.clears[0] - onset:.3f} s "
            f"after onset, {after_onset:.3f} s of agent audio heard after it"
        )
        assert sim.log.clears[0] > onset and sim.log.clears[0] - onset <= 0.3
        assert after_onset <= 0.35
        await wait_until(lambda: _heard_after(sim, barge_end), 4, "the answer to the barge-in")
        await sim.agent_quiet(0.6)
        assert _echo_score(sim, barge_end, "stop") > 0.9
        heard_s = _heard_between(sim, reply, sim.log.clears[0])
        await _hang_up(server, sim)
    [connection] = _connections(gemini, first)
    assert bool(_sent(connection, "interrupted")) == model_generating
    told = _told_what_was_heard(connection, heard_s)
    events = _session(server, sim.call_sid).events
    [stored] = [e for e in events if NOTE_METADATA_KEY in (e.custom_metadata or {})]
    kept = stored.custom_metadata[NOTE_METADATA_KEY]  # history marks the words never heard
    assert (kept["heard"], kept["unheard"]) == told


def _told_what_was_heard(connection: ConnectionRecord, heard_s: float) -> tuple[str, str]:
    """The model was told, before the caller's interruption came to it, which words of its
    reply the caller heard: those spoken in the audio they heard, in proportion. Returns
    the words heard and those not heard."""
    [at] = [i for i, t in enumerate(connection.context) if NOTE.match(t.text)]
    reply, note, interruption = connection.context[at - 1 : at + 2]
    assert (reply.role, interruption.role) == ("model", "user")
    assert interruption.text.startswith("(caller speech")
    found = NOTE.match(note.text)
    assert found is not None
    heard, unheard = found["heard"] or "", found["unheard"]
    assert heard.split() + unheard.split() == reply.text.split()
    words = len(reply.text.split())
    assert abs(len(heard.split()) - words * heard_s / reply.audio_s) <= 1
    return heard, unheard


NOTE = re.compile(
    r'\(The caller interrupted you(?:\. Of your last reply they heard only: "(?P<heard>.*)"\.'
    r'| before hearing any of your last reply\.) They did not hear: "(?P<unheard>.*)"\)'
)


def _session(server: RunningServer, call_sid: str, caller: str = "+15550001111") -> Session:
    runner = server.app.extensions["telephony.runner"]
    found = asyncio.run_coroutine_threadsafe(
        runner.session_service.get_session(
            app_name=runner.app_name, user_id=caller, session_id=call_sid
        ),
        server.loop,
    ).result(5)
    assert found is not None
    return found


async def test_a_replaced_media_stream_carries_on_the_same_conversation(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    """Twilio opens a second stream for a call in progress: the old socket is closed, the new
    one carries the same live session (no second greeting, no second connection), and the
    caller's next question is answered over it."""
    first = len(gemini.connections)
    async with _call(server) as sim:
        await _greeted(sim)
        url = server.base_url.replace("http", "ws") + "/stream"
        async with connect(url, compression=None) as ws:
            again = CallerSimulator(ws, call_sid=sim.call_sid, parameters=sim.parameters)
            await again.begin()
            await asyncio.wait_for(sim.closed.wait(), 3)  # the server let the old one go
            await asyncio.sleep(1.5)
            assert not again.log.heard  # no second greeting
            _, end = await say(again, "sunday")
            await wait_until(lambda: _heard_after(again, end), 4, "the answer")
            await again.agent_quiet(0.8)
            assert _echo_score(again, end, "sunday") > 0.9
            await _hang_up(server, again)
    [connection] = _connections(gemini, first)
    assert len(connection.text_turns) == 1  # the greeting, once


async def test_a_key_press_reaches_the_model_and_is_answered(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    first = len(gemini.connections)
    async with _call(server) as sim:
        await _greeted(sim)
        pressed = time.monotonic()
        await sim.press("5")
        await wait_until(lambda: _heard_after(sim, pressed), 3, "an answer to the key")
        await _hang_up(server, sim)
    [connection] = _connections(gemini, first)
    assert connection.text_turns[1:] == ["(The caller pressed 5 on the keypad.)"]


async def test_keys_pressed_in_quick_succession_reach_the_model_as_one_turn(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    first = len(gemini.connections)
    async with _call(server) as sim:
        await _greeted(sim)
        for key in "4207#":
            await sim.press(key)
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        await _hang_up(server, sim)
    [connection] = _connections(gemini, first)
    assert len(connection.text_turns[1:]) == 1
    assert "4207#" in connection.text_turns[1]


async def _answered_across_a_reconnect(
    server: RunningServer, gemini: GeminiLiveService, plan: FaultPlan
) -> list[ConnectionRecord]:
    """Greeting, a question (during whose answer `plan` may strike), another question: both
    answered in full; returns the stand-in's connections for the call."""
    first = len(gemini.connections)
    gemini.plan(plan)
    async with _call(server) as sim:
        await _greeted(sim)
        for name in ("sunday", "time"):
            _, end = await say(sim, name)
            await wait_until(lambda e=end: _heard_after(sim, e), 6, f"the answer to {name}")
            await sim.agent_quiet(0.8)
            assert _echo_score(sim, end, name) > 0.9
        await _hang_up(server, sim)
    return _connections(gemini, first)


def _resumed(connections: list[ConnectionRecord]) -> None:
    """The second connection resumed the first one's session: the model kept its context."""
    assert len(connections) == 2
    old, new = connections
    assert new.resumed_handle is not None
    assert [t.text for t in new.context[: len(old.context)]] == [t.text for t in old.context]


async def test_go_away_when_idle_resumes_the_session(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    connections = await _answered_across_a_reconnect(
        server, gemini, FaultPlan.go_away(after_turns=1, time_left_s=0.5)
    )
    assert _sent(connections[0], "goAway") == 1
    _resumed(connections)


async def test_go_away_mid_reply_resumes_the_session_and_answers(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    connections = await _answered_across_a_reconnect(
        server, gemini, FaultPlan.go_away(after_turns=1, chunks=10, time_left_s=0.5)
    )
    _resumed(connections)


async def test_a_drop_while_holding_a_handle_resumes_the_session(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    connections = await _answered_across_a_reconnect(server, gemini, FaultPlan.drop(after_turns=2))
    assert connections[0].close_code == 1006
    _resumed(connections)


async def test_a_drop_without_a_handle_restarts_and_the_question_is_answered(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    connections = await _answered_across_a_reconnect(
        server, gemini, FaultPlan.drop(after_turns=1, chunks=10)
    )
    assert len(connections) == 2


async def test_a_stalled_model_is_restarted_and_the_question_answered(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    first = len(gemini.connections)
    gemini.plan(FaultPlan.stall())
    async with _call(server) as sim:
        await asyncio.sleep(1.0)
        _, end = await say(sim, "sunday")
        await wait_until(lambda: _heard_after(sim, end), STALL_S + 4, "an answer after a restart")
        await _hang_up(server, sim)
    assert len(_connections(gemini, first)) == 2


async def test_a_tool_call_is_run_and_answered(
    tool_server: RunningServer, gemini: GeminiLiveService
) -> None:
    """2.5 models send the toolCall, then turnComplete; ADK runs the tool after it."""
    first = len(gemini.connections)
    gemini.plan(FaultPlan.tool_call("opening_hours", {"day": "Sunday"}, after_turns=1))
    async with _call(tool_server) as sim:
        await _greeted(sim)
        _, end = await say(sim, "sunday")
        await wait_until(lambda: _heard_after(sim, end), 4, "the answer")
        await sim.agent_quiet(0.6)
        assert _echo_score(sim, end, "sunday") > 0.9
        await _hang_up(tool_server, sim)
    [connection] = _connections(gemini, first)
    assert connection.model == "models/gemini-2.5-flash-native-audio-preview-12-2025"
    [response] = connection.tool_responses
    assert response["name"] == "opening_hours"
    assert response["response"] == {"day": "Sunday", "hours": "closed"}


async def test_a_sip_call_s_facts_are_in_session_state_and_the_agent_s_instruction(
    tool_server: RunningServer, gemini: GeminiLiveService
) -> None:
    """A call to a Twilio SIP Domain: the webhook's facts ride the stream to the call, the
    session starts with them in its state, and ADK's `{telephony_caller}` templating puts the
    caller in the user's agent's instruction."""
    first = len(gemini.connections)
    sip = {
        "SipDomain": "example.sip.twilio.com",
        "SipCallId": "a84b4c76e66710@pbx.example.com",
        "SipHeader_X-Customer": "4711",
    }
    caller = "sip:alice@pbx.example.com"
    async with _call(tool_server, caller=caller, webhook_fields=sip) as sim:
        await _greeted(sim)
        await _hang_up(tool_server, sim)
    [connection] = _connections(gemini, first)
    instruction = connection.setup["systemInstruction"]["parts"][0]["text"]  # type: ignore[index]
    assert f"The caller's number is {caller}." in instruction
    state = _session(tool_server, sim.call_sid, caller).state
    assert state["telephony_caller"] == caller
    assert state["telephony_called"] == "+15550002222"
    assert state["telephony_direction"] == "inbound"
    assert state["telephony_call_sid"] == sim.call_sid
    assert state["telephony_sip"] == sip
    assert state["telephony_parameters"] == {}


async def test_the_agent_ends_the_call_once_its_goodbye_is_heard(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    """The model calls `end_call` and then says its last reply (3.x models answer the tool's
    result): the caller hears all of it, then the call is hung up."""
    first = len(gemini.connections)
    start = await scrape_idle(server)
    gemini.plan(FaultPlan.tool_call("end_call", after_turns=1))
    async with _call(server) as sim:
        await _greeted(sim)
        _, end = await say(sim, "sunday")
        await asyncio.wait_for(sim.closed.wait(), 10)
        hung_up = time.monotonic()
        assert _echo_score(sim, end, "sunday") > 0.9  # the goodbye, whole
        assert hung_up - max(h.end for h in sim.log.heard) < 1.0
    [connection] = _connections(gemini, first)
    [response] = connection.tool_responses
    assert response["name"] == "end_call"
    assert "ending" in response["response"]["result"]
    assert calls_ended(start, await scrape_idle(server), "agent_ended") == 1


@pytest.fixture(scope="module")
def transfer_server(
    gemini: GeminiLiveService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """The built-in agent with somewhere to transfer callers to."""
    with running_server(
        tmp_path_factory.mktemp("transfer"), agent="", transfer_to="+15557654321"
    ) as running:
        yield running


async def test_the_agent_transfers_the_caller_once_its_handover_line_is_heard(
    transfer_server: RunningServer, gemini: GeminiLiveService
) -> None:
    """The model calls `transfer_call` and says its handover line; the caller hears all of it,
    then Twilio (asking the <Connect action>) dials the target; the session says where the
    caller went."""
    first = len(gemini.connections)
    start = await scrape_idle(transfer_server)
    target = {"transfer_to": "+1 555 765 4321"}
    gemini.plan(FaultPlan.tool_call("transfer_call", target, after_turns=1))
    async with _call(transfer_server) as sim:
        await _greeted(sim)
        _, end = await say(sim, "sunday")
        await asyncio.wait_for(sim.closed.wait(), 10)
        assert _echo_score(sim, end, "sunday") > 0.9  # the handover line, whole
    assert (sim.log.transfers, sim.log.ended) == (["+15557654321"], "dial")
    [connection] = _connections(gemini, first)
    [response] = connection.tool_responses
    assert response["response"]["result"].startswith("Transferring the caller to +15557654321")
    events = _session(transfer_server, sim.call_sid).events
    said = [p.function_response for e in events for p in (e.content.parts if e.content else [])]
    assert any(r and r.name == "transfer_call" and "+15557654321" in str(r.response) for r in said)
    end = await scrape_idle(transfer_server)
    assert calls_ended(start, end, "transferred") == 1


async def test_a_transfer_outside_the_allow_list_is_refused_and_the_call_goes_on(
    transfer_server: RunningServer, gemini: GeminiLiveService
) -> None:
    plan = FaultPlan.tool_call("transfer_call", {"transfer_to": "+442071234567"}, after_turns=1)
    [connection] = await _answered_across_a_reconnect(transfer_server, gemini, plan)
    [response] = connection.tool_responses
    assert response["response"]["result"] == (
        "Could not transfer the call: transfers to +442071234567 are not allowed."
    )


async def test_the_agent_presses_keys_and_the_call_goes_on_over_a_new_stream(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    """`send_dtmf`: once the agent's reply is heard the stream ends, Twilio plays the tones
    (asked through the <Connect action>), and a new stream carries on the same call and live
    session."""
    first = len(gemini.connections)
    gemini.plan(FaultPlan.tool_call("send_dtmf", {"digits": "12#"}, after_turns=1))
    async with _call(server) as sim:
        await _greeted(sim)
        _, end = await say(sim, "sunday")
        await wait_until(lambda: len(sim.log.streams) == 2, 10, "the new stream")
        assert sim.log.digits_played == ["12#"]
        assert _echo_score(sim, end, "sunday") > 0.9  # heard before the keys
        await asyncio.sleep(0.5)
        _, end = await say(sim, "time")
        await wait_until(lambda: _heard_after(sim, end), 4, "the answer over the new stream")
        await sim.agent_quiet(0.6)
        assert _echo_score(sim, end, "time") > 0.9
        await _hang_up(server, sim)
    [connection] = _connections(gemini, first)  # one live session throughout
    [response] = connection.tool_responses
    assert response["response"]["result"] == "Sent the tones 12#."


@pytest.fixture(scope="module")
def limited_server(
    gemini: GeminiLiveService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """Limits short enough to reach in a test: 5 s of caller silence, 24 s a call."""
    with running_server(
        tmp_path_factory.mktemp("limits"), agent="", caller_idle_s=5.0, max_call_s=24.0
    ) as running:
        yield running


async def test_a_silent_caller_is_asked_once_then_hears_the_goodbye(
    limited_server: RunningServer, gemini: GeminiLiveService
) -> None:
    first = len(gemini.connections)
    start = await scrape_idle(limited_server)
    async with _call(limited_server) as sim:
        await _greeted(sim)
        await asyncio.wait_for(sim.closed.wait(), 20)
        heard = sim.log.heard_pcm()
    end = await scrape_idle(limited_server)
    assert calls_ended(start, end, "caller_idle") == 1
    [connection] = _connections(gemini, first)
    assert connection.text_turns[1:] == [IDLE_PROMPT]
    assert _sent(connection, "turnComplete") >= 2  # the model asked (a reply to the prompt)
    assert best_correlation(heard, pcm(asset("goodbye")))[0] > 0.9


async def test_the_time_limit_asks_the_model_to_wrap_up_then_ends_the_call(
    limited_server: RunningServer, gemini: GeminiLiveService
) -> None:
    first = len(gemini.connections)

    async def chat(sim: CallerSimulator) -> None:
        while True:  # never idle
            await say(sim, "sunday")
            await asyncio.sleep(2.0)

    start = await scrape_idle(limited_server)
    async with _call(limited_server) as sim:
        started = time.monotonic()
        await _greeted(sim)
        talking = asyncio.create_task(chat(sim))
        try:
            await asyncio.wait_for(sim.closed.wait(), 30)
        finally:
            talking.cancel()
        ended = time.monotonic() - started
        heard = sim.log.heard_pcm()
    end = await scrape_idle(limited_server)
    assert calls_ended(start, end, "time_limit") == 1
    [connection] = _connections(gemini, first)
    assert WRAP_UP_PROMPT in connection.text_turns
    goodbye = pcm(asset("goodbye"))
    assert 24 + len(goodbye) / 8000 < ended < 24 + len(goodbye) / 8000 + 2  # then the goodbye
    assert best_correlation(heard, goodbye)[0] > 0.9


async def test_a_call_over_a_300_ms_round_trip(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    """150-175 ms each way: answers heard in full, no silences inside them, barge-in in time."""
    async with _call(server, network=Network(delay_s=0.15, jitter_s=0.025, seed=1)) as sim:
        await _greeted(sim)
        for name in ("sunday", "time"):
            _, end = await say(sim, name)
            await wait_until(lambda e=end: _heard_after(sim, e), 4, f"the answer to {name}")
            await sim.agent_quiet(0.8)
            assert _echo_score(sim, end, name) > 0.9
            assert _underruns(sim, end, time.monotonic()) == []
        assert not sim.log.clears
        await _hang_up(server, sim)


async def _reply_heard(server: RunningServer, **line: object) -> float:
    """The caller asks a long question; the share of the answer (the stand-in echoes the
    question's speech) that they heard."""
    async with _call(server, **line) as sim:
        await _greeted(sim)
        _, end = await say(sim, "hello")
        start, end_s = speech_span_s("hello")
        answer_s = end_s - start
        await asyncio.sleep(answer_s + 2.0)
        await sim.agent_quiet(1.0)
        heard = _heard_between(sim, end, time.monotonic())
        await _hang_up(server, sim)
    return heard / answer_s


@pytest.mark.parametrize("sound", ["mm-hm", "cough"])
async def test_a_backchannel_or_cough_loses_nothing_of_the_reply(
    server: RunningServer, gemini: GeminiLiveService, sound: str
) -> None:
    share = await _reply_heard(server, interjections=[Interjection(sound, after_agent_s=1.0)])
    print(f"{sound} 1 s into the reply: {share:.0%} of it heard")
    assert share >= 0.9


async def test_a_handset_echo_of_the_agent_never_interrupts_it(
    server: RunningServer, gemini: GeminiLiveService
) -> None:
    """The model hears nothing of the echo: no interruption, and no turn taken from it."""
    first = len(gemini.connections)
    share = await _reply_heard(server, echo=Echo(level_db=-25.0, delay_s=0.15))
    print(f"-25 dB echo 150 ms late: {share:.0%} of the reply heard")
    assert share >= 0.9
    [connection] = _connections(gemini, first)
    assert _sent(connection, "interrupted") == 0
    assert [t.role for t in connection.context] == ["user", "model"] * 2


@pytest.fixture
def draining_server(gemini: GeminiLiveService, tmp_path: Path) -> Iterator[RunningServer]:
    """A server of its own: draining it turns every later call away."""
    with running_server(tmp_path, agent="") as running:
        yield running


async def test_last_words_are_heard_in_full_whatever_the_caller_or_the_model_do(
    draining_server: RunningServer, gemini: GeminiLiveService
) -> None:
    """The server drains (no grace) while the model is still generating an answer; the caller
    talks over the goodbye and the model, hearing them, reports `interrupted`. The goodbye is
    heard to its end all the same."""
    from telephony.server.app import drain

    first = len(gemini.connections)
    async with _call(draining_server) as sim:
        await _greeted(sim)
        _, end = await say(sim, "hello")
        await wait_until(lambda: _heard_after(sim, end), 3, "the answer")
        draining = asyncio.run_coroutine_threadsafe(
            drain(draining_server.app, 0.0), draining_server.loop
        )
        await asyncio.sleep(0.1)
        await sim.say(fixture("stop"))
        await asyncio.wait_for(asyncio.wrap_future(draining), 15)
        heard = sim.log.heard_pcm()
    [connection] = _connections(gemini, first)
    assert _sent(connection, "interrupted") == 1  # the model did try to cut in
    score, _ = best_correlation(heard, pcm(asset("goodbye")))
    assert score > 0.9
