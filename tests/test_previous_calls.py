"""A caller's earlier calls, summed up for the agent of their next one: the latest few, their
last lines, bounded; none for withheld numbers; a slow store costs the notes, not the call."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import NoReturn

import pytest
from google.adk.agents.run_config import RunConfig
from google.adk.events import Event
from google.adk.runners import Runner
from google.adk.sessions import InMemorySessionService, Session
from google.genai import types

from telephony.agents.echo import echo_app
from telephony.call.logs import CallLogger
from telephony.call.previous import (
    MAX_CALLS,
    MAX_LINE_CHARS,
    MAX_LINES,
    PREVIOUS_CALLS_KEY,
    STARTED_KEY,
    previous_calls,
)
from telephony.call.supervisor import PREVIOUS_CALLS_TIMEOUT_S, LiveSupervisor
from telephony.testing.simulator import place_call
from telephony.testing.virtual_clock import run_virtual

from .audio_tools import fixture
from .server import RunningServer, running_server, wait_until


def line(who: str, text: str, at: float) -> Event:
    heard = types.Transcription(text=text, finished=True)
    if who == "caller":
        return Event(author="user", input_transcription=heard, timestamp=at)
    return Event(author="phone_agent", output_transcription=heard, timestamp=at)


async def _call(
    sessions: InMemorySessionService, sid: str, started: float, lines: list[str], user: str
) -> None:
    session = await sessions.create_session(
        app_name="a", user_id=user, session_id=sid, state={STARTED_KEY: started}
    )
    for n, text in enumerate(lines):
        await sessions.append_event(
            session, line("caller" if n % 2 else "agent", text, started + 10 * (n + 1))
        )


async def test_the_latest_calls_are_summed_up_oldest_first() -> None:
    sessions = InMemorySessionService()
    start = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC
    for n in range(MAX_CALLS + 1):
        await _call(
            sessions, f"CA{n}", start + 3600 * n, [f"call {n} hello", f"call {n} hi"], "+1555"
        )
    await _call(sessions, "CAnow", start + 9 * 3600, [], "+1555")
    await _call(sessions, "CAother", start, ["someone else"], "+1666")
    notes = await previous_calls(sessions, app_name="a", user_id="+1555", session_id="CAnow")
    assert notes == "\n".join(
        [
            "Earlier calls from this number (oldest first):",
            "- 2026-09-21 15:13 UTC, 20 s:",
            "  agent: call 1 hello",
            "  caller: call 1 hi",
            "- 2026-09-21 16:13 UTC, 20 s:",
            "  agent: call 2 hello",
            "  caller: call 2 hi",
            "- 2026-09-21 17:13 UTC, 20 s:",
            "  agent: call 3 hello",
            "  caller: call 3 hi",
        ]
    )


async def test_each_call_keeps_its_last_lines_each_cut_short() -> None:
    sessions = InMemorySessionService()
    lines = [f"line {n}" for n in range(20)] + ["x" * 1000]
    await _call(sessions, "CA1", 1_790_000_000.0, lines, "+1555")
    notes = await previous_calls(sessions, app_name="a", user_id="+1555", session_id="CA2")
    kept = notes.splitlines()[2:]
    assert len(kept) == MAX_LINES
    assert kept[:-1] == [
        f"  {'agent' if n % 2 == 0 else 'caller'}: line {n}" for n in range(15, 20)
    ]
    assert len(kept[-1]) == len("  agent: ") + MAX_LINE_CHARS and kept[-1].endswith("…")
    assert "3 min 30 s" in notes


async def test_a_first_call_and_withheld_numbers_get_no_notes() -> None:
    sessions = InMemorySessionService()
    assert await previous_calls(sessions, app_name="a", user_id="+1555", session_id="CA1") == ""
    for withheld in ("anonymous", "unknown", "+266696687"):
        await _call(sessions, f"CA-{withheld}", 1_790_000_000.0, ["hi"], withheld)
        notes = await previous_calls(sessions, app_name="a", user_id=withheld, session_id="CAx")
        assert notes == ""


class _SlowStore(InMemorySessionService):
    """A session store whose listing never answers (a database under siege)."""

    async def list_sessions(self, *, app_name: str, user_id: str | None = None) -> NoReturn:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def _first_turn_state(
    sessions: InMemorySessionService, caller: str, previous: int = MAX_CALLS
) -> dict[str, object]:
    """Starts a call's live session for `caller` (echo agent) and returns its session's state
    once the session exists; also how long that took on the (virtual) clock."""
    runner = Runner(app=echo_app(), session_service=sessions, auto_create_session=True)
    supervisor = LiveSupervisor(
        runner,
        RunConfig(response_modalities=[types.Modality.AUDIO]),
        user_id=caller,
        session_id="CAnow",
        state={"telephony_caller": caller},
        restarts=0,
        connections_per_minute=6,
        previous_calls=previous,
        on_event=_ignore,
        on_reconnect=lambda: False,
        log=CallLogger("CAnow", mask=False),
    )
    started = asyncio.get_running_loop().time()
    run = asyncio.create_task(supervisor.run())
    async with asyncio.timeout(30):
        while (
            session := await sessions.get_session(
                app_name="echo", user_id=caller, session_id="CAnow"
            )
        ) is None:
            await asyncio.sleep(0.05)
    took = asyncio.get_running_loop().time() - started
    supervisor.close()
    await asyncio.wait_for(run, 10)
    return {**session.state, "took": took}


async def _ignore(event: object, output: bool) -> None:
    pass


async def _after_one_call(previous: int) -> dict[str, object]:
    sessions = InMemorySessionService()
    earlier = await sessions.create_session(
        app_name="echo", user_id="+1555", session_id="CAbefore", state={STARTED_KEY: 1.0}
    )
    await sessions.append_event(earlier, line("caller", "my order is late", 30.0))
    return await _first_turn_state(sessions, "+1555", previous)


def test_a_new_calls_session_starts_with_the_callers_earlier_calls() -> None:
    state = run_virtual(_after_one_call(MAX_CALLS))
    assert state[PREVIOUS_CALLS_KEY] == "\n".join(
        [
            "Earlier calls from this number (oldest first):",
            "- 1970-01-01 00:00 UTC, 29 s:",
            "  caller: my order is late",
        ]
    )
    assert state["telephony_caller"] == "+1555"
    assert isinstance(state[STARTED_KEY], float) and state[STARTED_KEY] > 1.7e9


def test_a_store_too_slow_for_earlier_calls_does_not_hold_the_call_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, "telephony.call"):
        state = run_virtual(_first_turn_state(_SlowStore(), "+1555"))
    assert state[PREVIOUS_CALLS_KEY] == "" and state["telephony_caller"] == "+1555"
    assert state["took"] == pytest.approx(PREVIOUS_CALLS_TIMEOUT_S, abs=0.2)
    assert "earlier calls not read: TimeoutError()" in caplog.text


def test_earlier_calls_are_given_only_when_asked_for() -> None:
    """Off by default (`TELEPHONY_PREVIOUS_CALLS=0`): a caller ID is easily forged."""
    state = run_virtual(_after_one_call(0))
    assert state[PREVIOUS_CALLS_KEY] == "" and state["telephony_caller"] == "+1555"


def test_a_summary_stored_for_an_earlier_call_does_not_reach_an_agent_not_given_it() -> None:
    """User state outlives the call that set it: a call not given earlier calls clears it."""

    async def main() -> dict[str, object]:
        sessions = InMemorySessionService()
        summed = {PREVIOUS_CALLS_KEY: "Earlier calls: caller: my PIN is 4821"}
        await sessions.create_session(
            app_name="echo", user_id="+1555", session_id="CAbefore", state=summed
        )
        return await _first_turn_state(sessions, "+1555", 0)

    assert run_virtual(main())[PREVIOUS_CALLS_KEY] == ""


async def test_an_outbound_calls_earlier_calls_are_not_given(tmp_path: Path) -> None:
    """An outbound call's `From` is the operator's own number: the calls before it under that
    "caller" were to other people, and must not reach this one's agent."""
    ours = "+15550009999"
    with running_server(tmp_path, previous_calls=MAX_CALLS) as server:

        async def call(sid: str, to: str, direction: str) -> dict[str, object]:
            async with place_call(
                server.base_url,
                call_sid=sid,
                caller=ours,
                callee=to,
                webhook_fields={"Direction": direction},
            ) as sim:
                await sim.say(fixture("hello"))
                await sim.finish_speaking()
                await wait_until(lambda: sim.log.heard, 10, "the echo")
                await sim.hang_up()
            return (await _stored(server, ours, sid)).state

        await call("CA1" + "0" * 31, "+15550000001", "inbound")
        inbound = await call("CA2" + "0" * 31, "+15550000002", "inbound")  # gets the first
        outbound = await call("CA3" + "0" * 31, "+15550000003", "outbound-api")
        second = await call("CA4" + "0" * 31, "+15550000004", "outbound-api")
    assert inbound[PREVIOUS_CALLS_KEY].startswith("Earlier calls from this number")
    assert outbound[PREVIOUS_CALLS_KEY] == second[PREVIOUS_CALLS_KEY] == ""


async def _stored(server: RunningServer, user: str, sid: str) -> Session:
    service = server.app.extensions["telephony.runner"].session_service
    get = service.get_session(app_name="echo", user_id=user, session_id=sid)
    session = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(get, server.loop))
    assert session is not None
    return session
