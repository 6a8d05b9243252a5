"""Several instances on one PostgreSQL database, as `telephony serve` processes: a caller's
second call, answered by the other instance, comes with the first call's history; an instance
killed mid-call has stored all but the last moments of it."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import pytest
from google.adk.sessions import DatabaseSessionService, Session

from telephony.call.previous import PREVIOUS_CALLS_KEY
from telephony.server.app import create_app
from telephony.settings import Settings
from telephony.testing.gemini_live import GeminiLiveService, running_in_thread
from telephony.testing.simulator import CallerSimulator, place_call

from . import postgres
from .server import echo_process, say, wait_until

CALLER = "+15557770001"


@pytest.fixture
def gemini() -> Iterator[GeminiLiveService]:
    with running_in_thread() as service:
        yield service


async def _stored(url: str, app: str, call_sid: str) -> Session:
    sessions = DatabaseSessionService(url)
    try:
        session = await sessions.get_session(app_name=app, user_id=CALLER, session_id=call_sid)
    finally:
        await sessions.close()
    assert session is not None
    return session


def _said(session: Session) -> list[str]:
    """The transcript lines stored, in order."""
    lines = []
    for event in session.events:
        for heard in (event.input_transcription, event.output_transcription):
            if heard and heard.text:
                lines.append(heard.text)
    return lines


async def _talk(sim: CallerSimulator, utterances: int) -> list[float]:
    """Says `stop` that many times, each after the agent's answer; returns when each
    answer had been heard to its end."""
    heard_by = []
    await wait_until(lambda: sim.log.heard, 10, "the greeting")
    await sim.agent_quiet(0.6)
    for _ in range(utterances):
        _, end = await say(sim, "stop")
        assert await sim.agent_audio_after(end, 10) is not None, "no answer"
        await sim.agent_quiet(0.6)
        heard_by.append(sim.log.heard[-1].end)
    return heard_by


async def test_a_callers_next_call_on_another_instance_knows_the_first(
    tmp_path: Path, postgres_uri: str, gemini: GeminiLiveService
) -> None:
    """Instance A answers the first call, instance B the second: B's session starts with
    A's call summed up in the caller's state, and the built-in agent's instruction has it."""
    env = gemini.environ() | {"TELEPHONY_PREVIOUS_CALLS": "3"}
    with (
        echo_process(tmp_path, agent="", session_uri=postgres_uri, env=env) as (_, a),
        echo_process(tmp_path, agent="", session_uri=postgres_uri, env=env) as (_, b),
    ):
        async with place_call(a, caller=CALLER, call_sid="CA" + "a" * 32) as first:
            await _talk(first, 1)
            await first.hang_up()
        seen_by_first = len(gemini.connections)
        async with place_call(b, caller=CALLER, call_sid="CA" + "b" * 32) as second:
            await wait_until(lambda: second.log.heard, 10, "the greeting")
            await second.hang_up()
    earlier = await _stored(postgres_uri, "phone_agent", "CA" + "a" * 32)
    later = await _stored(postgres_uri, "phone_agent", "CA" + "b" * 32)
    notes = later.state[PREVIOUS_CALLS_KEY]
    lines = _said(earlier)
    assert lines and all(line in notes for line in lines)
    assert notes.startswith("Earlier calls from this number")
    [connection] = gemini.connections[seen_by_first:]
    instruction = connection.setup["systemInstruction"]["parts"][0]["text"]  # type: ignore[index]
    assert notes in instruction
    # user state: every session of the caller reads the latest notes, the first call's too
    assert earlier.state[PREVIOUS_CALLS_KEY] == notes


async def test_an_instance_killed_mid_call_has_stored_all_but_its_last_second(
    tmp_path: Path, postgres_uri: str
) -> None:
    """SIGKILL, no shutdown: every turn the caller had heard the end of a second before is
    in the database (the caller's line and the agent's), written while the call went on."""
    with echo_process(tmp_path, session_uri=postgres_uri) as (proc, url):
        sid = "CA" + "c" * 32
        async with place_call(url, caller=CALLER, call_sid=sid) as sim:
            heard_by = await _talk(sim, 2)
            _, end = await say(sim, "stop")  # and the kill comes during the third answer
            assert await sim.agent_audio_after(end, 10) is not None, "no answer"
            os.kill(proc.pid, signal.SIGKILL)
            killed = asyncio.get_running_loop().time()
            proc.wait(5)
            await asyncio.sleep(0.2)
    done = [t for t in heard_by if t < killed - 1.0]
    assert len(done) == 2
    lines = _said(await _stored(postgres_uri, "echo", sid))
    assert sum(line.startswith("(caller spoke for") for line in lines) >= len(done)
    assert sum(line.startswith("(echo of") for line in lines) >= len(done)


async def test_each_instance_has_twilio_come_back_to_itself_for_the_call() -> None:
    """Behind a load balancer, the webhook reaches any instance; the TwiML it answers sends
    the stream, the `<Connect action>` and the stream's status callbacks to that instance's
    own origin (`TELEPHONY_STREAM_URL`), the one that knows the call."""
    shared, own = "http://voice.example.com", "http://a1.voice.example.com"
    app = create_app(Settings(agent="echo", session_uri="", public_url=shared, stream_url=own))
    async with app.test_app():
        answer = await app.test_client().post(
            "/voice", form={"CallSid": "CA" + "d" * 32, "From": CALLER, "To": "+15550002222"}
        )
        twiml = ElementTree.fromstring(await answer.get_data(as_text=True))
        await app.extensions["telephony.calls"].close_all("test over")
    connect = twiml.find("Connect")
    assert connect is not None and connect.get("action") == own + "/after-stream"
    stream = connect.find("Stream")
    assert stream is not None and stream.get("url") == "ws://a1.voice.example.com/stream"
    assert stream.get("statusCallback") == own + "/status"


def test_without_postgresql_these_tests_skip_unless_ci_requires_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(postgres.REQUIRE_VARIABLE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no PostgreSQL: no initdb"):
        postgres.unavailable("no initdb")
    monkeypatch.setenv(postgres.REQUIRE_VARIABLE, "1")
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL is required"):
        postgres.unavailable("no initdb")
