"""Call history: what a call keeps in its session (call/record.py) and how `telephony calls
list` / `show` print it (server/history.py), from sessions built here and from real calls."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from google.adk.events import Event
from google.adk.sessions import InMemorySessionService, Session
from google.genai import types

from telephony.agents import AgentSpec, phone_run_config
from telephony.agents.echo import EchoFaults, echo_app
from telephony.call import CallInfo, Outcome
from telephony.call.record import CallRecord, end_event, record_event, status_event
from telephony.cli import main
from telephony.server.app import create_app
from telephony.server.history import (
    BadQuery,
    CallSummary,
    HistoryError,
    calls_text,
    format_call,
    format_summary,
    list_calls,
    parse_since,
    store_unstarted,
)
from telephony.settings import Settings
from telephony.testing.gemini_live import FaultPlan, GeminiLiveService
from telephony.testing.simulator import place_call
from telephony.testing.virtual_clock import run_virtual
from telephony.twilio.signatures import SignatureChecker

from .audio_tools import fixture
from .server import RunningServer, running_server, say, wait_until
from .test_realpath import gemini as gemini  # the module fixture, shared

T0 = 1_790_000_000.0
"""2026-09-21 14:13:20 UTC"""


def _at(event: Event, seconds: float) -> Event:
    return event.model_copy(update={"timestamp": T0 + seconds})


def _said(author: str, seconds: float, text: str | None, finished: bool = True) -> Event:
    words = types.Transcription(text=text, finished=finished)
    field = "input_transcription" if author == "user" else "output_transcription"
    return _at(Event(author=author, **{field: words}), seconds)


def _content(author: str, seconds: float, part: types.Part, **extra: Any) -> Event:
    role = "user" if author == "user" else "model"
    return _at(
        Event(author=author, content=types.Content(role=role, parts=[part]), **extra), seconds
    )


STATE = {
    "telephony_call_sid": "CA1",
    "telephony_caller": "+15551234567",
    "telephony_called": "+15550002222",
    "telephony_direction": "inbound",
    "telephony_started_at": T0,
}


def _transferred_call() -> Session:
    note = {"heard": "We open at nine", "unheard": "and close at five", "heard_s": 1.0}
    events = [
        _content("user", 0.1, types.Part(text="Greet the caller.")),
        _said("agent", 0.5, "Hello, how can I help?"),
        _said("user", 3.0, "When are you open?"),
        _said("agent", 4.0, "We open at nine", finished=False),
        _said("agent", 4.5, " and close at five", finished=False),
        _said("agent", 5.0, None),
        _at(record_event("barge_in", {"source": "caller speech"}), 5.2),
        _content(
            "user",
            5.3,
            types.Part(text="(The caller interrupted you...)"),
            custom_metadata={"telephony_note": {**note, "generated_s": 2.0}},
        ),
        _at(record_event("keys", {"digits": "1#"}), 7.0),
        _content("user", 7.0, types.Part(text="(The caller pressed 1# on the keypad.)")),
        _content(
            "agent",
            8.0,
            types.Part(
                function_call=types.FunctionCall(
                    name="transfer_call", args={"transfer_to": "+15557654321"}
                )
            ),
        ),
        _content(
            "user",
            8.1,
            types.Part(
                function_response=types.FunctionResponse(
                    name="transfer_call", response={"result": "Transferring the caller."}
                )
            ),
        ),
        _at(record_event("reconnect", {"restarts": 0, "reconnects": 1}), 8.5),
        _at(record_event("reconnect", {"restarts": 1, "reconnects": 2}), 9.0),
        _at(record_event("status", {"StreamEvent": "stream-stopped"}), 10.0),
        _at(
            end_event(
                "transferred",
                "transferred to +15557654321",
                started_at=T0,
                direction="inbound",
                transfer_to="+15557654321",
            ),
            10.5,
        ),
        _at(record_event("status", {"CallStatus": "completed", "CallDuration": "95"}), 95.0),
    ]
    state = {
        **STATE,
        "telephony_outcome": "transferred",
        "telephony_transfer_to": "+15557654321",
        "telephony_duration_s": 10.5,
        "telephony_call_duration_s": 95,
        "telephony_turns": 3,
        "telephony_call_status": "completed",
    }
    return Session(id="CA1", app_name="a", user_id="+15551234567", state=state, events=events)


def test_a_call_reads_as_a_timeline_from_its_start() -> None:
    assert format_call(_transferred_call(), tz=UTC) == "\n".join(
        [
            "call CA1",
            "  when       2026-09-21 14:13:20",
            "  who        +15551234567",
            "  called     +15550002222",
            "  direction  inbound",
            "  duration   1:35 (with the agent 0:10)",
            "  ended      transferred to +15557654321",
            "  status     stream-stopped, completed after 95 s",
            "",
            "    0:00.1  text      to the model: Greet the caller.",
            "    0:00.5  agent     Hello, how can I help?",
            "    0:03.0  caller    When are you open?",
            "    0:04.0  agent     We open at nine [not heard: and close at five]",
            "    0:05.2  barge-in  caller talked over the agent (caller speech)",
            "    0:07.0  keys      caller pressed 1#",
            "    0:08.0  tool      transfer_call(transfer_to='+15557654321')",
            "    0:08.1  result    transfer_call: Transferring the caller.",
            "    0:08.5  reconnect model reconnected (#1)",
            "    0:09.0  restart   live session restarted (#1)",
            "    0:10.0  status    Twilio: stream-stopped",
            "    0:10.5  end       transferred to +15557654321",
            "    1:35.0  status    Twilio: completed after 95 s",
        ]
    )


def test_masking_hides_the_numbers_not_the_words() -> None:
    shown = format_call(_transferred_call(), mask=True, tz=UTC)
    assert "+15551234567" not in shown and "+*******4567" in shown
    assert "transferred to +*******4321" in shown and "When are you open?" in shown
    # nor the digits a tool was given, nor the keys pressed (a PIN, an account number)
    assert "+15557654321" not in shown
    assert "transfer_call(transfer_to='+*******4321')" in shown
    assert "caller pressed **" in shown and "pressed 1#" not in shown


def test_a_list_line_says_when_who_how_long_and_how_it_ended() -> None:
    call = CallSummary.of(_transferred_call())
    assert call is not None
    assert format_summary(call, tz=UTC) == (
        "2026-09-21 14:13:20  CA1  +15551234567      inbound           1:35   3 turns  "
        "transferred to +15557654321"
    )
    ongoing = CallSummary.of(Session(id="CA2", app_name="a", user_id="u", state=STATE))
    assert ongoing is not None and ongoing.ended().startswith("no end record")
    assert CallSummary.of(Session(id="x", app_name="a", user_id="u", state={})) is None


def test_since_takes_times_ago_and_iso_dates() -> None:
    now = T0
    assert parse_since("2h", now) == now - 7200
    assert parse_since("3d", now) == now - 3 * 86400
    assert parse_since("2026-09-21T14:00:00+00:00", now) == T0 - 800
    assert parse_since("2026-09-21", now) == datetime(2026, 9, 21).astimezone().timestamp()
    for bad in ("yesterday", "2x", "", "-3d"):
        with pytest.raises(BadQuery, match="--since"):
            parse_since(bad, now)


def test_the_list_filters_by_time_and_caller_latest_first() -> None:
    async def main() -> list[list[str]]:
        sessions = InMemorySessionService()
        for n, caller in enumerate(["+15551234567", "+15559990000", "sip:alice@pbx.example"]):
            state = {**STATE, "telephony_caller": caller, "telephony_started_at": T0 + n * 3600}
            await sessions.create_session(
                app_name="a", user_id=caller, session_id=f"CA{n}", state=state
            )
        await sessions.create_session(app_name="a", user_id="u", session_id="other", state={})

        async def sids(**query: Any) -> list[str]:
            return [c.call_sid for c in await list_calls(sessions, "a", **query)]

        return [
            await sids(),
            await sids(since=T0 + 1800),
            await sids(caller="555 123"),
            await sids(caller="alice"),
            await sids(limit=1),
        ]

    assert asyncio.run(main()) == [
        ["CA2", "CA1", "CA0"],
        ["CA2", "CA1"],
        ["CA0"],
        ["CA2"],
        ["CA2"],
    ]


def test_an_unknown_call_or_a_bad_limit_is_an_error() -> None:
    sessions = InMemorySessionService()
    with pytest.raises(HistoryError, match="no call CA9"):
        asyncio.run(calls_text(sessions, "a", call_sid="CA9"))
    with pytest.raises(BadQuery):
        asyncio.run(calls_text(sessions, "a", limit=-1))
    assert asyncio.run(calls_text(sessions, "a")).startswith("(no calls of the agent 'a'")


def test_the_command_needs_a_session_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "none.db")
    assert main(["calls", "list", "--session-db", missing, "--agent", "echo"]) == 2
    assert "no session database" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


# --- real calls ---------------------------------------------------------------------------

TOKEN = "history-auth-token"
ACCOUNT = "AC" + "0" * 32


def _post(server: RunningServer, path: str, form: dict[str, str], signature: str = "") -> int:
    """Posts as Twilio does: form-encoded and signed (`signature` overrides, "" signs)."""
    url = server.base_url + path
    signed = signature or SignatureChecker(TOKEN, server.base_url).sign(url, form)
    request = urllib.request.Request(
        url, data=urllib.parse.urlencode(form).encode(), headers={"X-Twilio-Signature": signed}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def _stream_status(sid: str, event: str) -> dict[str, str]:
    """A Media Stream's status callback (Twilio's fields: no caller number)."""
    return {
        "AccountSid": ACCOUNT,
        "CallSid": sid,
        "StreamSid": "MZ" + "1" * 32,
        "StreamName": "MZ" + "1" * 32,
        "StreamEvent": event,
        "Timestamp": "2026-11-30T00:00:00Z",
    }


def _call_status(sid: str, status: str, caller: str, **more: str) -> dict[str, str]:
    """A call progress callback (Twilio's standard call fields with it)."""
    form = {"AccountSid": ACCOUNT, "CallSid": sid, "From": caller, "To": "+15550002222"}
    return {**form, "Direction": "inbound", "CallStatus": status, **more}


def _stored(server: RunningServer, sid: str) -> bool:
    """The server's session store has a session for the call."""
    runner = server.app.extensions["telephony.runner"]
    listed = asyncio.run_coroutine_threadsafe(
        runner.session_service.list_sessions(app_name=runner.app_name), server.loop
    ).result(5)
    return any(s.id == sid for s in listed.sessions)


async def _history(
    capsys: pytest.CaptureFixture[str], db: Path, *args: str, agent: str = "echo"
) -> str:
    """What `telephony calls ARGS` prints (in a thread: the command runs its own loop)."""
    capsys.readouterr()
    argv = ["calls", *args, "--session-db", str(db), "--agent", agent]
    assert await asyncio.to_thread(main, argv) == 0
    return capsys.readouterr().out


async def test_a_call_s_history_from_its_first_word_to_twilio_s_last_callback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real call through the server on loopback: what the caller said and the agent said
    (the part cut off marked), the barge-in, the key presses, how it ended, and Twilio's
    signed status callbacks, the last ones after the call is gone; forged ones refused and
    not kept."""
    sid, caller = "CA" + "5" * 32, "+15551230000"
    with running_server(tmp_path, twilio_auth_token=TOKEN) as server:
        async with place_call(
            server.base_url, auth_token=TOKEN, call_sid=sid, caller=caller
        ) as sim:
            assert _post(server, "/status", _stream_status(sid, "stream-started")) == 204
            await asyncio.sleep(1.0)
            _, spoken = await say(sim, "hello")
            await wait_until(lambda: any(at > spoken for at, _ in sim.log.media), 3, "the echo")
            await asyncio.sleep(0.3)
            await say(sim, "stop")
            await wait_until(lambda: bool(sim.log.clears), 2, "the barge-in")
            await asyncio.sleep(len(fixture("stop")) / 8000 + 1.5)
            await sim.press_keys("42#")
            await asyncio.sleep(0.5)
            await sim.hang_up()
            await wait_until(lambda: server.calls.get(sid) is None, 5, "the call to end")
        assert _post(server, "/status", _stream_status(sid, "stream-stopped")) == 204
        forged = _call_status(sid, "completed", caller, CallDuration="99")
        assert _post(server, "/status", forged, signature="forged") == 403
        unsigned = urllib.request.Request(
            server.base_url + "/status", data=urllib.parse.urlencode(forged).encode()
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(unsigned, timeout=5)
        assert refused.value.code == 403
        assert (
            _post(server, "/status", _call_status(sid, "completed", caller, CallDuration="21"))
            == 204
        )
    db = tmp_path / "sessions.db"
    shown = await _history(capsys, db, "show", sid)
    header, _, timeline = shown.partition("\n\n")
    assert f"who        {caller}" in header
    assert "duration   0:21 (with the agent 0:" in header
    assert "ended      caller hung up" in header
    assert "status     stream-started, stream-stopped, completed after 21 s" in header
    kinds = [line.split()[1] for line in timeline.splitlines()]
    assert kinds.index("agent") < kinds.index("caller")  # the greeting chime first
    assert (
        kinds.index("caller") < kinds.index("barge-in") < kinds.index("keys") < kinds.index("end")
    )
    assert "[not heard: " in timeline  # the echo the caller cut off
    assert "caller pressed 42#" in timeline
    assert "Twilio: completed after 21 s" in timeline and "99" not in shown
    [line] = (await _history(capsys, db, "list", "--caller", "1230000")).splitlines()
    assert sid in line and "inbound" in line and line.endswith("caller hung up")
    assert "0:21" in line and "turns" in line


async def test_calls_that_never_reached_the_agent_are_in_the_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A caller turned away busy, and an outbound call nobody answered (its callbacks come
    before any session exists)."""
    busy_sid, unanswered = "CA" + "6" * 32, "CA" + "7" * 32
    with running_server(tmp_path, twilio_auth_token=TOKEN, max_calls=1) as server:
        async with place_call(server.base_url, auth_token=TOKEN, call_sid="CA" + "8" * 32):
            form = _call_status(busy_sid, "ringing", "+15553334444")
            assert _post(server, "/voice", form) == 200
            await wait_until(lambda: _stored(server, busy_sid), 5, "the refusal to be kept")
        server.loop.call_soon_threadsafe(server.calls.placed, unanswered, 600.0)
        for status in ("initiated", "ringing", "no-answer"):
            form = _call_status(unanswered, status, "+15550001000", Direction="outbound-api")
            assert _post(server, "/status", form) == 204
        assert server.calls.outbound == 0
    db = tmp_path / "sessions.db"
    listed = (await _history(capsys, db, "list")).splitlines()
    [turned_away] = [line for line in listed if busy_sid in line]
    assert "+15553334444" in turned_away and turned_away.endswith("turned away (busy message)")
    [not_answered] = [line for line in listed if unanswered in line]
    assert "outbound-api" in not_answered and not_answered.endswith("not answered")
    assert "+15550002222" in not_answered  # who was called, not our own number
    shown = await _history(capsys, db, "show", unanswered)
    assert "who        +15550002222\n  from       +15550001000\n" in shown
    assert "status     initiated, ringing, no-answer" in shown


@pytest.mark.parametrize(
    ("resumable", "kind"),
    [(True, "reconnect model reconnected (#1)"), (False, "restart   live session restarted (#1)")],
)
def test_reconnects_and_restarts_of_the_live_session_are_kept(resumable: bool, kind: str) -> None:
    """The model's connection drops mid-call: ADK reconnects (a resumption handle) or the
    bridge restarts the live session (none); either is on the call's timeline."""

    async def run() -> str:
        settings = Settings(agent="echo", session_db="")
        faults = EchoFaults(drop_after_s=6.0, resumable=resumable, faulty_connections=1)
        app = create_app(
            settings, AgentSpec(echo_app(faults=faults), phone_run_config(settings), None)
        )
        async with app.test_app():
            async with place_call(app=app, call_sid="CA" + "3" * 32) as sim:
                await asyncio.sleep(1.0)
                await sim.say(fixture("hello"))
                await sim.finish_speaking()
                await asyncio.sleep(8.0)
                await sim.hang_up()
            await app.extensions["telephony.calls"].wait_idle(10.0)
            runner = app.extensions["telephony.runner"]
            session = await runner.session_service.get_session(
                app_name=runner.app_name, user_id="+15550001111", session_id="CA" + "3" * 32
            )
            return format_call(session)

    shown = run_virtual(run())
    assert kind in shown
    assert "(a reconnect cut the reply off)" not in shown  # no barge-in: the caller did nothing
    assert "ended      caller hung up" in shown


@pytest.mark.parametrize(
    ("tool", "args", "tool_line", "ended"),
    [
        (
            "transfer_call",
            {"transfer_to": "+1 555 765 4321"},
            "transfer_call(transfer_to='+1 555 765 4321')",
            "transferred to +15557654321",
        ),
        ("end_call", {}, "end_call()", "agent ended the call"),
    ],
)
async def test_tool_calls_and_how_the_agent_ended_the_call(
    gemini: GeminiLiveService,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tool: str,
    args: dict[str, str],
    tool_line: str,
    ended: str,
) -> None:
    """The production path (ADK's Gemini model against the Gemini Live stand-in): the tool
    call and its result are on the timeline, the end says where the caller went, and a
    transferred call's duration is Twilio's once Twilio reports the call over."""
    sid, caller = "CA" + "4" * 32, "+15550001111"
    with running_server(tmp_path, agent="", transfer_to="+15557654321") as server:
        gemini.plan(FaultPlan.tool_call(tool, args, after_turns=1))
        async with place_call(server.base_url, call_sid=sid, caller=caller) as sim:
            await wait_until(lambda: sim.log.heard, 5, "the greeting")
            await sim.agent_quiet(0.6)
            await say(sim, "sunday")
            await asyncio.wait_for(sim.closed.wait(), 10)
        await wait_until(lambda: server.calls.get(sid) is None, 5, "the call to end")
        assert (
            _post(server, "/status", _call_status(sid, "completed", caller, CallDuration="95"))
            == 204
        )
    shown = await _history(capsys, tmp_path / "sessions.db", "show", sid, agent="")
    assert f"ended      {ended}" in shown
    assert f"tool      {tool_line}" in shown
    assert f"result    {tool}: " in shown
    assert f"end       {ended}" in shown
    assert "duration   1:35 (with the agent 0:" in shown


def test_a_call_s_record_waits_for_its_session_keeps_order_and_counts_losses() -> None:
    """Facts made before the live run has a session wait for it (stamped when they
    happened), in order; Twilio's last callbacks after the end go to the same session; facts
    of a call without any session are counted as lost."""

    async def run() -> tuple[list[str], int, list[str]]:
        sessions = InMemorySessionService()
        stored = await sessions.create_session(app_name="a", user_id="u", session_id="CA1")
        live: list[Any] = []
        record = CallRecord(lambda: live[0] if live else None, call_sid="CA1")
        record.event("keys", digits="1")
        record.append(status_event({"StreamEvent": "stream-error"}))
        live.append((sessions, stored))
        record.event("barge_in", source="caller speech")
        record.end("caller hung up (stop)", Outcome.HUNG_UP, "inbound")
        await record.close(lambda: asyncio.sleep(0))
        record.append(status_event({"CallStatus": "completed"}))  # Twilio's last word, after

        await asyncio.sleep(0.01)
        after = await sessions.get_session(app_name="a", user_id="u", session_id="CA1")
        assert after is not None
        kinds = [next(iter(e.custom_metadata or {})) for e in after.events]
        assert after.state["telephony_outcome"] == "hung_up"
        times = [e.timestamp for e in after.events]
        assert times == sorted(times)

        nowhere = CallRecord(lambda: None, call_sid="CA2")
        nowhere.event("keys", digits="2")

        async def no_session() -> None:
            return None

        await nowhere.close(no_session)
        return kinds, nowhere.lost, [k for k in after.state if k.startswith("telephony_")]

    kinds, lost, state = asyncio.run(run())
    assert kinds == [
        "telephony_keys",
        "telephony_status",
        "telephony_barge_in",
        "telephony_end",
        "telephony_status",
    ]
    assert lost == 1
    assert set(state) == {
        "telephony_outcome",
        "telephony_end_reason",
        "telephony_ended_at",
        "telephony_duration_s",
        "telephony_turns",
        "telephony_call_status",
    }


def test_a_turned_away_call_keeps_twilios_last_word_in_its_own_session() -> None:
    """Turned away at the webhook, the call's session holds how; Twilio's final status comes
    later for the same call and joins it (a second session would be refused)."""

    async def main() -> Session | None:
        sessions = InMemorySessionService()
        info = CallInfo("CA1", "+15551234567", "+15550002222")
        how = {"outcome": Outcome.REFUSED, "reason": "busy"}
        await store_unstarted(sessions, "a", info, [], **how)
        final = status_event({"CallStatus": "completed", "CallDuration": "4"})
        await store_unstarted(sessions, "a", info, [final], **how)
        return await sessions.get_session(app_name="a", user_id=info.caller, session_id="CA1")

    session = run_virtual(main())
    assert session is not None
    kinds = [next(iter(e.custom_metadata or {}), "") for e in session.events]
    assert kinds == ["telephony_end", "telephony_status"]


def test_a_store_that_cannot_be_read_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "sessions.db"
    garbage.write_bytes(b"not a database at all" * 100)
    assert main(["calls", "list", "--agent", "echo", "--session-uri", f"sqlite:///{garbage}"]) == 2
    assert "cannot read the session store" in capsys.readouterr().err


def test_masking_reaches_into_what_a_tool_took_and_gave_whatever_its_shape() -> None:
    lookup = types.FunctionCall(name="lookup", args={"who": {"phone": "+15557654321"}})
    found = types.FunctionResponse(name="lookup", response={"phone": "+15551112222", "n": 3})
    events = [
        _content("phone_agent", 1.0, types.Part(function_call=lookup)),
        _content("user", 1.1, types.Part(function_response=found)),
    ]
    call = Session(id="CA1", app_name="a", user_id="+15551234567", state=STATE, events=events)
    shown = format_call(call, mask=True, tz=UTC)
    assert "+15557654321" not in shown and "+15551112222" not in shown
    assert "+*******4321" in shown and "+*******2222" in shown
