"""The Twilio REST stand-in, driven by the real `twilio` client as the product drives it, with
a fake application on loopback (the same Twilio-facing fake as the simulator's TwiML tests)
answering its webhook and callbacks and serving the Media Stream."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
from twilio.base.exceptions import TwilioRestException
from twilio.rest import Client

from telephony.audio import mulaw_decode
from telephony.testing.twilio_rest import (
    ACCOUNT_SID,
    FROM_NUMBER,
    FarEnd,
    OutboundCall,
    TwilioRestService,
    running_in_thread,
)
from telephony.twilio.media_stream import media_message

from .server import serving
from .test_simulator_twiml import (
    PUBLIC,
    TOKEN,
    FakeServer,
    connect,
    noise,
    twiml,
    until,
)

API_KEY, API_SECRET = "SK" + "3" * 32, "key-secret"
TO = "+15557654321"
VOICE = f"{PUBLIC}/voice"
STATUS = f"{PUBLIC}/status"
AMD = f"{PUBLIC}/amd"
EVENTS = ["initiated", "ringing", "answered", "completed"]
FAST = {"latency_s": 0.02, "default": FarEnd(ring_s=0.2)}


@pytest.fixture
async def app() -> AsyncIterator[tuple[FakeServer, str]]:
    """The application's side, on loopback: the webhook opens a stream without an action (so
    the call ends with it); callbacks are answered 200."""
    server = FakeServer(
        {"/voice": twiml(connect(None, "outbound")), "/status": "", "/amd": "", "/fail": 500}
    )
    async with serving(server.app) as url:
        yield server, url


@pytest.fixture
def standin() -> Iterator[TwilioRestService]:
    """The stand-in in its thread, signing with the fake application's token."""
    options: dict[str, Any] = {**FAST, "api_keys": {API_KEY: API_SECRET}, "auth_token": TOKEN}
    with running_in_thread(**options) as service:
        yield service


def client(service: TwilioRestService, *credentials: str) -> Client:
    twilio = Client(*(credentials or (ACCOUNT_SID, TOKEN)))
    twilio.api.base_url = service.base_url
    return twilio


async def place(service: TwilioRestService, local: str, **fields: Any) -> str:
    """Places a call with the real client (off the loop: it blocks) and returns its SID."""
    service.reach[PUBLIC] = local
    options: dict[str, Any] = {"to": TO, "from_": FROM_NUMBER, "url": VOICE} | fields
    call = await asyncio.to_thread(client(service).calls.create, **options)
    return str(call.sid)


def statuses(call: OutboundCall) -> list[str]:
    return [c.form["CallStatus"] for c in call.callbacks if c.kind == "status"]


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if len(pcm) else 0.0


async def test_an_answered_call_from_request_to_completed(
    app: tuple[FakeServer, str], standin: TwilioRestService
) -> None:
    """The request as the client sends it; the resource as Twilio answers; status callbacks
    in order and signed; the webhook on answer; the stream through the simulator, whose far
    end the test makes speak; AMD's verdict on a person; the call completes with its stream."""
    server, local = app
    sid = await place(
        standin,
        local,
        status_callback=STATUS,
        status_callback_event=EVENTS,
        status_callback_method="POST",
        machine_detection="Enable",
        async_amd="true",
        async_amd_status_callback=AMD,
        async_amd_status_callback_method="POST",
    )
    [created] = standin.requests
    assert (created.method, created.path, created.status) == (
        "POST",
        f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json",
        201,
    )
    assert created.credential == ACCOUNT_SID
    assert created.form == {
        "To": [TO],
        "From": [FROM_NUMBER],
        "StatusCallback": [STATUS],
        "StatusCallbackEvent": EVENTS,
        "StatusCallbackMethod": ["POST"],
        "MachineDetection": ["Enable"],
        "AsyncAmd": ["true"],
        "AsyncAmdStatusCallback": [AMD],
        "AsyncAmdStatusCallbackMethod": ["POST"],
        "Url": [VOICE],
    }
    assert re.fullmatch("CA[0-9a-f]{32}", sid)
    call = standin.calls[sid]

    leg = await server.leg(0)
    # The stream's start reaches the application before the stand-in's thread holds the sim.
    await standin.wait_for(lambda: call.sim is not None, 5)
    assert call.sim is not None and call.status == "in-progress"
    assert leg.signature_problem is None
    assert leg.start["start"]["callSid"] == sid
    assert leg.start["start"]["accountSid"] == ACCOUNT_SID
    assert leg.start["start"]["customParameters"] == {"leg": "outbound"}
    leg.send(media_message(leg.stream_sid, noise(0.5, seed=4)))  # the agent speaks
    speech = noise(0.4, seed=5)
    await standin.run(call.sim.say(speech))
    await standin.run(call.sim.finish_speaking())
    await standin.wait_for(lambda: call.answered_by is not None, 5)
    await asyncio.sleep(0.2)
    leg.hang_up()  # the application ends the call: no action, no verbs left
    await standin.wait_for(lambda: call.settled and len(call.callbacks) == 5, 5)

    [voice] = [r for r in server.requests if r.path == "/voice"]
    assert voice.signature_problem is None
    assert voice.form == {
        "AccountSid": ACCOUNT_SID,
        "ApiVersion": "2010-04-01",
        "CallSid": sid,
        "CallStatus": "in-progress",
        "Called": TO,
        "Caller": FROM_NUMBER,
        "Direction": "outbound-api",
        "From": FROM_NUMBER,
        "To": TO,
    }
    status = [c for c in call.callbacks if c.kind == "status"]
    assert statuses(call) == ["initiated", "ringing", "in-progress", "completed"]
    assert [c.form["SequenceNumber"] for c in status] == ["0", "1", "2", "3"]
    assert all(c.status == 200 and c.method == "POST" for c in call.callbacks)
    assert {c.form["CallbackSource"] for c in status} == {"call-progress-events"}
    assert {c.form["Direction"] for c in status} == {"outbound-api"}
    assert [c.at for c in status] == sorted(c.at for c in status)
    completed = status[-1].form
    assert completed["CallDuration"] == str(call.duration) and completed["Duration"] == "1"
    assert "CallDuration" not in status[2].form
    seen = [r for r in server.requests if r.path in ("/status", "/amd")]
    assert [r.signature_problem for r in seen] == [None] * 5
    assert [r.form["CallStatus"] for r in seen if r.path == "/status"] == statuses(call)

    [amd] = [c for c in call.callbacks if c.kind == "amd"]
    assert set(amd.form) == {"AccountSid", "AnsweredBy", "CallSid", "MachineDetectionDuration"}
    assert amd.form["AnsweredBy"] == "human" == call.answered_by
    assert 1700 <= int(amd.form["MachineDetectionDuration"]) < 2300  # 0.6 s hello, 1.2 s quiet

    # The far end said hello, then what the test made it say; it heard the agent.
    frames = b"".join(leg.frames())
    assert speech[:1600] in frames
    assert call.sim.log.ended == "hangup" and len(call.sim.log.heard) == 1
    fetched = await asyncio.to_thread(client(standin).calls(sid).fetch)
    assert (fetched.status, fetched.direction, fetched.answered_by) == (
        "completed",
        "outbound-api",
        "human",
    )
    assert fetched.duration == str(call.duration)
    assert [e.what for e in call.events][:4] == ["queued", "initiated", "ringing", "answered"]


@pytest.mark.parametrize(
    "mode, verdict, after_ms",
    [("Enable", "machine_start", 1000), ("DetectMessageEnd", "machine_end_beep", 2300)],
)
async def test_a_machine_answers_beeps_and_records_the_message(
    app: tuple[FakeServer, str], standin: TwilioRestService, mode: str, verdict: str, after_ms: int
) -> None:
    """A machine says its greeting and beeps; AMD says so (at once with `Enable`, after the
    beep with `DetectMessageEnd`); the message the application leaves then is recorded."""
    server, local = app
    standin.far_ends[TO] = FarEnd("machine", ring_s=0.2, greeting=noise(1.5, seed=6))
    sid = await place(
        standin,
        local,
        machine_detection=mode,
        machine_detection_speech_threshold=1000,
        async_amd="true",
        async_amd_status_callback=AMD,
    )
    call = standin.calls[sid]
    await standin.wait_for(lambda: call.callbacks, 5)
    [amd] = call.callbacks
    assert amd.form["AnsweredBy"] == verdict and amd.kind == "amd"
    # from the answer: the webhook and stream, then 1.5 s greeting, 0.3 s gap, 0.5 s beep
    assert after_ms <= int(amd.form["MachineDetectionDuration"]) < after_ms + 500
    leg = await server.leg(0)
    await standin.wait_for(lambda: call.recording_from is not None, 5)
    await standin.wait_for(lambda: standin_time(standin) > (call.recording_from or 0), 5)
    message = noise(1.0, seed=7)
    leg.send(media_message(leg.stream_sid, message))
    await asyncio.sleep(1.2)
    leg.hang_up()
    await standin.wait_for(lambda: call.settled, 5)
    recorded = call.message()
    assert len(recorded) >= 8000 and rms(recorded) > 1000
    heard = np.frombuffer(mulaw_decode(message), np.int16)
    assert abs(rms(recorded) - rms(heard)) < 0.2 * rms(heard)
    assert call.status == "completed" and call.answered_by == verdict


def standin_time(service: TwilioRestService) -> float:
    """The service loop's clock (events and the simulator's log are on it)."""
    assert service._loop is not None
    return service._loop.time()


@pytest.mark.parametrize(
    "to, events",
    [
        ("+15550000001", ["initiated", "busy"]),
        ("+15550000002", ["initiated", "ringing", "no-answer"]),
    ],
)
async def test_busy_and_unanswered_calls_end_without_the_webhook(
    app: tuple[FakeServer, str], standin: TwilioRestService, to: str, events: list[str]
) -> None:
    server, local = app
    standin.far_ends.update(
        {"+15550000001": FarEnd("busy", ring_s=0.1), "+15550000002": FarEnd("no-answer")}
    )
    sid = await place(
        standin, local, to=to, timeout=1, status_callback=STATUS, status_callback_event=EVENTS
    )
    call = standin.calls[sid]
    await standin.wait_for(lambda: call.settled, 5)
    assert statuses(call) == events
    assert call.callbacks[-1].form["CallDuration"] == "0"
    assert call.callbacks[-1].form["Duration"] == "0"
    assert [r.path for r in server.requests] == ["/status"] * len(events)
    assert call.sim is None and not server.legs


async def test_by_default_only_the_completed_callback_and_a_failing_one_is_not_retried(
    app: tuple[FakeServer, str], standin: TwilioRestService
) -> None:
    server, local = app
    sid = await place(standin, local, status_callback=f"{PUBLIC}/fail")
    call = standin.calls[sid]
    (await server.leg(0)).hang_up()
    await standin.wait_for(lambda: call.settled, 5)
    await asyncio.sleep(0.3)
    [completed] = call.callbacks
    assert completed.status == 500 and completed.form["CallStatus"] == "completed"
    assert [r.path for r in server.requests] == ["/voice", "/fail"]


async def test_hanging_up_a_call_in_progress(
    app: tuple[FakeServer, str], standin: TwilioRestService
) -> None:
    """`Status=completed` ends the call: Twilio stops the stream, the call completes."""
    server, local = app
    sid = await place(standin, local, status_callback=STATUS)
    leg = await server.leg(0)
    ended = await asyncio.to_thread(client(standin).calls(sid).update, status="completed")
    assert ended.status == "completed"
    call = standin.calls[sid]
    await standin.wait_for(
        lambda: call.settled and call.sim is not None and call.sim.closed.is_set()
    )
    await until(lambda: leg.messages[-1]["event"] == "stop")
    assert statuses(call) == ["completed"]
    update = standin.requests[-1]
    assert (update.method, update.form) == ("POST", {"Status": ["completed"]})


async def test_hanging_up_a_ringing_call_cancels_it(
    app: tuple[FakeServer, str], standin: TwilioRestService
) -> None:
    server, local = app
    standin.far_ends[TO] = FarEnd(ring_s=5.0)
    sid = await place(standin, local, status_callback=STATUS, status_callback_event=EVENTS)
    call = standin.calls[sid]
    await standin.wait_for(lambda: call.status == "ringing")
    await asyncio.to_thread(client(standin).calls(sid).update, status="completed")
    await standin.wait_for(lambda: call.settled)
    assert statuses(call) == ["initiated", "ringing", "canceled"]
    assert [r.path for r in server.requests] == ["/status"] * 3


async def test_an_api_key_authenticates(standin: TwilioRestService) -> None:
    twilio = client(standin, API_KEY, API_SECRET, ACCOUNT_SID)
    call = await asyncio.to_thread(
        twilio.calls.create, to=TO, from_=FROM_NUMBER, twiml="<Response><Hangup/></Response>"
    )
    assert call.status == "queued" and call.direction == "outbound-api"
    assert call.account_sid == ACCOUNT_SID and call.to == TO and call._from == FROM_NUMBER
    assert call.uri == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{call.sid}.json"
    assert standin.requests[0].credential == API_KEY


@pytest.mark.parametrize(
    "credentials, fields, status, code",
    [
        ((ACCOUNT_SID, "wrong"), {}, 401, 20003),
        ((API_KEY, "wrong", ACCOUNT_SID), {}, 401, 20003),
        ((API_KEY, API_SECRET, "AC" + "9" * 32), {}, 404, 20404),
        ((), {"to": "555-1234"}, 400, 21211),
        ((), {"from_": "caller"}, 400, 21212),
        ((), {"from_": "+15559999999"}, 400, 21210),
        ((), {"to": ""}, 400, 21201),
        ((), {"url": None}, 400, 21205),
        ((), {"url": "voice"}, 400, 21205),
        ((), {"status_callback_event": ["answered", "hungup"]}, 400, 21626),
    ],
)
async def test_refusals_as_twilio_answers_them(
    standin: TwilioRestService,
    credentials: tuple[str, ...],
    fields: dict[str, Any],
    status: int,
    code: int,
) -> None:
    options = {"to": TO, "from_": FROM_NUMBER, "url": VOICE} | fields
    if options["url"] is None:
        del options["url"]
    with pytest.raises(TwilioRestException) as raised:
        await asyncio.to_thread(client(standin, *credentials).calls.create, **options)
    assert (raised.value.status, raised.value.code) == (status, code)
    assert raised.value.msg and not standin.calls
    assert standin.requests[0].status == status


@pytest.mark.parametrize(
    "status, code, expected", [(500, None, 20500), (429, None, 20429), (400, 21215, 21215)]
)
async def test_the_next_create_can_be_made_to_fail(
    standin: TwilioRestService, status: int, code: int | None, expected: int
) -> None:
    """Once: the create after it goes through."""
    standin.fail_next(status, code)
    create = client(standin).calls.create
    with pytest.raises(TwilioRestException) as raised:
        await asyncio.to_thread(create, to=TO, from_=FROM_NUMBER, url=VOICE)
    assert (raised.value.status, raised.value.code) == (status, expected)
    retried = await asyncio.to_thread(create, to=TO, from_=FROM_NUMBER, url=VOICE)
    assert retried.status == "queued" and list(standin.calls) == [retried.sid]


async def test_amd_without_async_holds_the_webhook_until_it_decides(
    app: tuple[FakeServer, str], standin: TwilioRestService
) -> None:
    """The machine's greeting and beep go by before the webhook, which says who answered;
    the machine records everything on the stream."""
    server, local = app
    standin.far_ends[TO] = FarEnd("machine", ring_s=0.1, greeting=noise(1.0, seed=8))
    sid = await place(
        standin,
        local,
        machine_detection="DetectMessageEnd",
        machine_detection_speech_threshold=1000,
    )
    call = standin.calls[sid]
    leg = await server.leg(0)
    [voice] = server.requests
    assert voice.form["AnsweredBy"] == "machine_end_beep" == call.answered_by
    assert voice.form["MachineDetectionDuration"] == "1900"  # 1 s, 0.3 s, 0.5 s beep, 0.1 s
    assert call.recording_from is not None
    leg.send(media_message(leg.stream_sid, noise(0.3, seed=9)))
    await asyncio.sleep(0.5)
    leg.hang_up()
    await standin.wait_for(lambda: call.settled, 5)
    assert 2400 <= len(call.message()) and call.callbacks == []
    assert all(frame == b"\xff" * 160 for frame in leg.frames())  # it said nothing on the stream
