"""The Quart application: Twilio's voice webhook, the Media Streams WebSocket, and health."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from google.adk.runners import Runner
from google.adk.sessions import BaseSessionService, InMemorySessionService
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Quart, Response, request, websocket

from ..agents import AgentSpec, load_agent, warm_up
from ..call import Call, CallInfo, CallOptions, Outcome, asset
from ..call.logs import mask_number
from ..call.record import status_event, status_fields
from ..settings import Settings
from ..twilio.media_stream import Connected, ProtocolError, Start, parse
from ..twilio.rest import (
    BadNumber,
    Credentials,
    NoCredentials,
    OutboundCall,
    OutboundError,
    place,
)
from ..twilio.signatures import SignatureChecker, websocket_url
from ..twilio.twiml import busy, call_parameters, connect_stream, dial, hang_up
from . import history
from .capacity import Admission, LoopMonitor
from .metrics import ServerFigures, metrics_registry
from .registry import CallRegistry
from .sessions import WriteBehindSessionService

__all__ = [
    "AFTER_STREAM_PATH",
    "AMD_PATH",
    "STATUS_PATH",
    "STREAM_PATH",
    "TooManyCalls",
    "create_app",
    "drain",
    "place_outbound",
]

log = logging.getLogger(__name__)

STREAM_PATH = "/stream"
OUTBOUND_SLACK_S = 300.0
"""Beyond the call time limit, how long an outbound call counts without Twilio saying it is
over (ringing, a lost callback)."""
STATUS_PATH = "/status"
"""Where Twilio posts call and stream status callbacks."""
AMD_PATH = "/answered-by"
"""Where Twilio posts the result of answering machine detection."""
AFTER_STREAM_PATH = "/after-stream"
"""The `<Connect action>`: where Twilio asks what to do once a call's stream has ended."""
MAX_FRAME_BYTES = 64 * 1024
"""A 20 ms media frame is about 300 bytes of JSON; anything this large is not Twilio."""
MAX_BAD_MESSAGES = 50
"""A socket that sends this many malformed messages is not Twilio having a bad moment: it
is closed."""
START_TIMEOUT_S = 10.0
"""Twilio sends `connected` and `start` at once; a socket without `start` by then is closed."""
SEND_TIMEOUT_S = 5.0
"""A write to Twilio that has not gone out in this long means the socket is dead: hang up."""


class TooManyCalls(OutboundError):
    """`TELEPHONY_MAX_OUTBOUND_CALLS` are being placed or in progress."""


_OUTBOUND_STATUS: dict[type[OutboundError], tuple[int, str]] = {
    TooManyCalls: (429, "max_outbound_calls"),
    BadNumber: (400, "bad_number"),
    NoCredentials: (503, "no_credentials"),
}
"""`POST /calls` answers a call not placed with these (and counts it by the label); Twilio's
own refusals with 502 (`twilio`)."""


def create_app(settings: Settings, spec: AgentSpec | None = None) -> Quart:
    spec = spec or load_agent(settings.agent, settings)
    if settings.mask_callers:
        # ADK's DEBUG lines print whole requests (transcripts, DTMF text): not with masking on.
        adk_log = logging.getLogger("google_adk")
        adk_log.setLevel(max(adk_log.getEffectiveLevel(), logging.INFO))
    store = settings.session_store()
    sessions: BaseSessionService = (
        WriteBehindSessionService(store) if store else InMemorySessionService()
    )
    runner = Runner(app=spec.app, session_service=sessions, auto_create_session=True)
    options = CallOptions(
        playback_lead_ms=settings.playback_lead_ms,
        barge_in_aggressiveness=settings.barge_in_aggressiveness,
        barge_in_frames=settings.barge_in_frames,
        barge_in_min_speech_ms=settings.barge_in_min_speech_ms,
        barge_in_resume_ms=settings.barge_in_resume_ms,
        keys_idle_s=settings.keys_idle_s,
        caller_silence_ms=settings.caller_silence_ms,
        greeting=spec.greeting,
        record_dir=Path(settings.record_dir) if settings.record_dir else None,
        model_restarts=settings.model_restarts,
        model_stall_s=settings.model_stall_s,
        model_connections_per_minute=settings.model_connections_per_minute,
        mask_callers=settings.mask_callers,
        transfer_allow=settings.transfers(),
        caller_id=settings.caller_id,
        heard_notes=settings.heard_notes,
        max_call_s=settings.max_call_s,
        caller_idle_s=settings.caller_idle_s,
        previous_calls=settings.previous_calls,
    )
    calls = CallRegistry(
        lambda info: Call(info, runner=runner, run_config=spec.run_config, options=options),
        connect_timeout_s=settings.stream_connect_timeout_s,
    )
    app = Quart(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    app.extensions["telephony.calls"] = calls
    app.extensions["telephony.runner"] = runner
    admission = Admission(settings.max_loop_busy, settings.call_cost)
    load = LoopMonitor(on_sample=lambda busy, now: admission.learn(busy, len(calls), now))
    exposed = metrics_registry(
        calls.metrics,
        calls.active,
        ServerFigures(
            load,
            admission,
            clock=lambda: asyncio.get_running_loop().time(),
            session_write_errors=lambda: (
                sessions.write_errors if isinstance(sessions, WriteBehindSessionService) else 0
            ),
        ),
    )

    def refusal(now: float) -> tuple[str, str] | None:
        """Why a new call cannot be taken now, if it cannot: a label to count it by, and
        the reason to log."""
        if calls.draining:
            return "shutdown", "the server is shutting down"
        if settings.max_calls and len(calls) >= settings.max_calls:
            return "max_calls", f"at capacity ({len(calls)} calls)"
        if settings.max_loop_lag_ms and load.lag_ms > settings.max_loop_lag_ms:
            return "loop_lag", f"overloaded (event loop {load.lag_ms:.0f} ms late)"
        if settings.max_loop_busy and load.busy > settings.max_loop_busy:
            return "loop_busy", f"overloaded (event loop busy {load.busy:.0%} of the time)"
        if (reason := admission.refusal(len(calls), now)) is not None:
            return "capacity", reason
        return None

    shown = mask_number if settings.mask_callers else str

    def admin() -> bool:
        """The request may see how the server is doing: it carries `TELEPHONY_ADMIN_TOKEN`,
        or, with none set, the server is a local one (nobody else reaches it)."""
        if not settings.admin_token:
            return settings.local and not settings.public_url
        return bearer(settings.admin_token)

    def bearer(token: str) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), token.encode()
        )

    def public_base() -> str:
        return settings.public_url.rstrip("/") or f"{request.scheme}://{request.host}"

    def stream_base(fallback: str) -> str:
        """This instance's origin for media streams (what Twilio connects to and signs)."""
        return (settings.stream_url or settings.public_url).rstrip("/") or fallback

    def checker(base: str) -> SignatureChecker | None:
        if not settings.twilio_auth_token:
            return None
        return SignatureChecker(settings.twilio_auth_token, base)

    @app.get("/healthz")
    async def healthz() -> tuple[dict[str, object], int]:
        """503 while draining, so a load balancer sends new calls to other instances; the
        details only for those allowed to see them (`admin`)."""
        status = "draining" if calls.draining else "ok"
        if not admin():
            return {"status": status}, 503 if calls.draining else 200
        body = {
            "status": status,
            "active_calls": len(calls),
            "tasks": len(asyncio.all_tasks()),
            "loop_lag_ms": round(load.lag_ms, 1),
            "loop_busy": round(load.busy, 3),
            "calls_starting": admission.starting(asyncio.get_running_loop().time()),
            "call_cost": round(admission.cost, 4),
            "call_capacity": int(admission.capacity) if admission.budget else None,
        }
        return body, 503 if calls.draining else 200

    @app.get("/metrics")
    async def metrics() -> Response | tuple[str, int, dict[str, str]]:
        if not admin():
            return "a valid bearer token is required\n", 401, {"WWW-Authenticate": "Bearer"}
        return Response(generate_latest(exposed), content_type=CONTENT_TYPE_LATEST)

    async def signed_form() -> dict[str, str] | tuple[str, int]:
        """A Twilio request's form, once its signature and CallSid are checked; else the
        refusal to send back. Twilio signs the URL it was given: the shared public one, or
        (outbound calls, the `<Connect action>`) this instance's own."""
        form = (await request.form).to_dict()
        base = public_base()
        checkers = [c for b in dict.fromkeys((base, stream_base(base))) if (c := checker(b))]
        reasons = [
            c.check_webhook(
                request.path,
                request.query_string.decode(),
                form,
                request.headers.get("X-Twilio-Signature"),
            )
            for c in checkers
        ]
        if checkers and all(reasons):
            log.warning(
                "%s for %s rejected (403): %s", request.path, form.get("CallSid", "?"), reasons[0]
            )
            return "invalid Twilio signature\n", 403
        if not form.get("CallSid"):
            log.warning("%s rejected (400): no CallSid in the form", request.path)
            return "missing CallSid\n", 400
        return form

    def stream_twiml(base: str, info: CallInfo, digits: str = "") -> Response:
        """Connects the call's stream to this instance; Twilio asks `AFTER_STREAM_PATH` here
        what to do when the stream ends, and posts the stream's status here (the instance
        that knows the call)."""
        origin = stream_base(base)
        twiml = connect_stream(
            websocket_url(origin, STREAM_PATH),
            info.stream_parameters(),
            action=origin + AFTER_STREAM_PATH,
            digits=digits,
            status_callback=origin + STATUS_PATH,
        )
        return Response(twiml, content_type="text/xml")

    @app.post("/voice")
    async def voice() -> Response | tuple[str, int]:
        base = public_base()
        form = await signed_form()
        if isinstance(form, tuple):
            return form
        call_sid = form["CallSid"]
        now = asyncio.get_running_loop().time()
        info = CallInfo.from_parameters(call_sid, call_parameters(form))
        if (refused := refusal(now)) is not None:
            calls.metrics.refused(form.get("Direction", ""), refused[0])
            log.warning("call %s: turned away: %s", call_sid, refused[1])
            calls.spawn(turned_away(info, refused[1]))
            return Response(busy(), content_type="text/xml")
        admission.admit(now)
        log.info(
            "call %s: incoming from %s to %s", call_sid, shown(info.caller), shown(info.callee)
        )
        calls.prestart(info)
        return stream_twiml(base, info)

    async def turned_away(info: CallInfo, reason: str) -> None:
        """A call the agent never took is in the history too."""
        try:
            await history.store_unstarted(
                sessions, spec.app.name, info, [], outcome=Outcome.REFUSED, reason=reason
            )
        except Exception as exc:
            log.error("call %s: not kept in the history: %r", info.call_sid, exc)

    @app.post(AFTER_STREAM_PATH)
    async def after_stream() -> Response | tuple[str, int]:
        """Twilio asks what next once a call's stream has ended: connect the caller to where
        the agent transferred them, press keys and stream again, or hang up."""
        base = public_base()
        form = await signed_form()
        if isinstance(form, tuple):
            return form
        call_sid = form["CallSid"]
        handover = calls.take_handover(call_sid)
        if handover is not None and handover.transfer_to:
            log.info("call %s: connecting the caller to the transfer target", call_sid)
            twiml = dial(handover.transfer_to, handover.caller_id)
            return Response(twiml, content_type="text/xml")
        call = calls.get(call_sid)
        if handover is not None and handover.digits and call is not None:
            log.info("call %s: Twilio plays the keys, then a new stream", call_sid)
            return stream_twiml(base, call.info, handover.digits)
        log.info("call %s: stream over; hanging up", call_sid)
        return Response(hang_up(), content_type="text/xml")

    @app.post(STATUS_PATH)
    async def status() -> tuple[str, int]:
        """Twilio's status callbacks: call progress (`CallStatus`) and the stream's
        (`StreamEvent`: stream-started, stream-stopped, stream-error), each kept in the call's
        history (see `call.record`), also once the call has left this server."""
        form = await signed_form()
        if isinstance(form, tuple):
            return form
        event = form.get("StreamEvent") or form.get("CallStatus") or "an unknown status"
        if duration := form.get("CallDuration"):
            event += f" after {duration} s"
        if error := form.get("StreamError"):
            event += f" ({error})"
        sid, fields = form["CallSid"], status_fields(form)
        fact = status_event(fields)
        kept = calls.keep(sid, fact)
        unstarted = calls.status(sid, event)
        try:  # the history's loss, not Twilio's: it would retry a callback refused
            if unstarted:  # an outbound call that never started here: no session yet
                info = CallInfo.from_parameters(sid, call_parameters(form))
                how = fields.get("CallStatus", "")
                await history.store_unstarted(
                    sessions, spec.app.name, info, unstarted, outcome=how, reason=event
                )
            elif not kept:
                user = form.get("From") or calls.caller_of(sid)
                if not await history.store_late(sessions, spec.app.name, sid, user, fact):
                    log.warning("call %s: %s not kept: no session for the call", sid, event)
        except Exception as exc:
            log.error("call %s: %s not kept: %r", sid, event, exc)
        return "", 204

    @app.post(AMD_PATH)
    async def answered_by() -> tuple[str, int]:
        """Twilio's asynchronous answering machine detection: who took an outbound call."""
        form = await signed_form()
        if isinstance(form, tuple):
            return form
        who = form.get("AnsweredBy", "unknown")
        calls.keep(form["CallSid"], status_event({"AnsweredBy": who}))
        if (call := calls.get(form["CallSid"])) is None:
            log.warning("call %s: answered by %s, but the call is over", form["CallSid"], who)
        else:
            call.answered_by(who)
        return "", 204

    @app.post("/calls")
    async def place_call() -> (
        tuple[dict[str, str], int] | tuple[dict[str, str], int, dict[str, str]]
    ):
        """Places an outbound call: `{"to": "+1...", "from": "+1..."}` (from: optional) with
        `Authorization: Bearer TELEPHONY_CALLS_TOKEN`."""
        if not settings.calls_token:
            return {"error": "outbound calls are off: set TELEPHONY_CALLS_TOKEN"}, 403
        if not bearer(settings.calls_token):
            log.warning("POST /calls rejected (401): bad or missing bearer token")
            challenge = {"WWW-Authenticate": "Bearer"}
            return {"error": "a valid bearer token is required"}, 401, challenge
        if (refused := refusal(asyncio.get_running_loop().time())) is not None:
            log.warning("POST /calls refused (503): %s", refused[1])
            calls.metrics.not_placed[refused[0]] += 1
            return {"error": f"not placing calls now: {refused[1]}"}, 503
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("to"), str):
            return {"error": 'the body must be JSON like {"to": "+15551234567"}'}, 400
        try:
            sid = await outbound(body["to"], str(body.get("from") or ""))
        except OutboundError as exc:
            log.warning("outbound call to %s not placed: %s", shown(body["to"]), exc)
            status, reason = _OUTBOUND_STATUS.get(type(exc), (502, "twilio"))
            calls.metrics.not_placed[reason] += 1
            return {"error": str(exc)}, status
        return {"call_sid": sid}, 201

    async def outbound(to: str, from_: str) -> str:
        """Places a call whose answer connects to this instance."""
        if settings.max_outbound_calls and calls.outbound >= settings.max_outbound_calls:
            raise TooManyCalls(
                f"{calls.outbound} outbound calls already (TELEPHONY_MAX_OUTBOUND_CALLS)"
            )
        calls.placing += 1
        try:
            # the call, its callbacks and its stream all come back to this instance
            sid = await place_outbound(settings, stream_base(public_base()), to, from_)
        finally:
            calls.placing -= 1
        calls.placed(sid, forget_after_s=(settings.max_call_s or 4 * 3600) + OUTBOUND_SLACK_S)
        log.info("call %s: placed to %s", sid, shown(to))
        return sid

    app.extensions["telephony.outbound"] = outbound

    @app.websocket(STREAM_PATH)
    async def stream() -> tuple[str, int] | None:
        signatures = checker(stream_base(f"http://{websocket.host}"))
        if signatures is not None:
            reason = signatures.check_websocket(
                websocket.path,
                websocket.query_string.decode(),
                websocket.headers.get("X-Twilio-Signature"),
            )
            if reason:
                log.warning("media stream upgrade rejected (403): %s", reason)
                return "invalid Twilio signature\n", 403
        await websocket.accept()
        await serve_stream(calls)
        return None

    @app.before_serving
    async def prepare() -> None:
        await sessions.get_session(app_name=spec.app.name, user_id="", session_id="")
        await warm_up(spec.run_config)
        load.start()

    @app.after_serving
    async def shutdown() -> None:
        await load.stop()
        await calls.close_all("server shutting down")
        if isinstance(sessions, WriteBehindSessionService):
            await sessions.close()

    return app


async def place_outbound(settings: Settings, base: str, to: str, from_: str = "") -> str:
    """Has Twilio call `to` from `from_` (default `TELEPHONY_CALLER_ID`); once answered, the
    call comes to the server at `base` like an incoming one, with status callbacks and
    answering machine detection posted there too. Returns the call SID."""
    call = OutboundCall(
        to=to,
        from_=from_ or settings.caller_id,
        webhook_url=base + "/voice",
        status_callback=base + STATUS_PATH,
        amd_callback=base + AMD_PATH,
    )
    credentials = Credentials(
        settings.twilio_account_sid,
        settings.twilio_api_key,
        settings.twilio_api_secret,
        settings.twilio_auth_token,
    )
    return await place(call, credentials, settings.rest_api_url)


async def call_out(app: Quart, to: str, from_: str = "") -> str:
    """Places a call from a serving app, as `POST /calls` does (same limits); its SID."""
    sid: str = await app.extensions["telephony.outbound"](to, from_)
    return sid


async def outbound_over(app: Quart, call_sid: str) -> str:
    """How Twilio reported the outbound call over (`completed after 42 s`, `busy`...)."""
    calls: CallRegistry = app.extensions["telephony.calls"]
    return await calls.outbound_over(call_sid)


async def drain(app: Quart, timeout_s: float) -> None:
    """Graceful shutdown, before the server stops listening (see `telephony serve`)."""
    await app.extensions["telephony.calls"].drain(timeout_s, asset("goodbye"))


async def serve_stream(calls: CallRegistry) -> None:
    """Reads one Media Stream until Twilio stops it, the socket closes or the call ends
    (returning closes the socket, and Twilio moves on to the TwiML after <Connect>). A stream
    replaced by a newer one for the same call closes without ending the call."""
    finished = asyncio.Event()
    claimed: list[tuple[Call, asyncio.Event]] = []
    reader = asyncio.create_task(_read_stream(calls, claimed, finished))
    try:
        await finished.wait()
    finally:
        reader.cancel()
        # The reader may have claimed a call in the step it was cancelled in: let it finish
        # before closing what it claimed.
        await asyncio.wait({reader})
        for call, replaced in claimed:
            if call.done.is_set():
                continue  # the registry closes it; Twilio need not wait (a transfer's <Dial>)
            if not replaced.is_set():
                await call.close("media stream closed", Outcome.STREAM_ERROR)


async def _read_stream(
    calls: CallRegistry, claimed: list[tuple[Call, asyncio.Event]], finished: asyncio.Event
) -> None:
    watchers: list[asyncio.Task[None]] = []
    where = "stream"
    bad = 0
    connected: tuple[Connected, float] | None = None

    def refuse(problem: str) -> bool:
        """Logs a bad message; True when the socket has sent too many and must go."""
        nonlocal bad
        bad += 1
        log.warning("%s: %s", where, problem)
        if bad >= MAX_BAD_MESSAGES:
            log.warning("%s: closing the stream after %d bad messages", where, bad)
            return True
        return False

    try:
        while True:
            if claimed:
                frame = await websocket.receive()
            else:
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                    # that arrives as the message does, and this task would outlive its stream.
                    async with asyncio.timeout(START_TIMEOUT_S):
                        frame = await websocket.receive()
                except TimeoutError:
                    log.warning("stream: no start within %.0f s; closing it", START_TIMEOUT_S)
                    return
            if len(frame) > MAX_FRAME_BYTES:
                if refuse(f"dropped a {len(frame)}-byte frame (limit {MAX_FRAME_BYTES})"):
                    return
                continue
            try:
                event = parse(frame)
            except ProtocolError as exc:
                if refuse(f"ignored malformed message: {exc}"):
                    return
                continue
            if isinstance(event, Connected):
                # recorded once `start` says which call this is
                connected = (event, asyncio.get_running_loop().time())
                continue
            if isinstance(event, Start):
                if claimed:
                    if refuse("ignored a second start on the same socket"):
                        return
                    continue
                call = calls.claim(
                    CallInfo.from_parameters(event.call_sid, event.custom_parameters)
                )
                if call is None:
                    log.warning(
                        "call %s: a stream for a call that is over; closing it", event.call_sid
                    )
                    return
                if connected is not None and call.recorder is not None:
                    call.recorder.twilio_in(*connected)
                # bound here: the call's tasks run outside the websocket context
                replaced = call.attach(event, _sender(call, websocket.send))
                claimed.append((call, replaced))
                where = f"call {event.call_sid}"
                watchers += [
                    asyncio.create_task(_set_when(call.done, finished)),
                    asyncio.create_task(_set_when(replaced, finished)),
                ]
                continue
            if not claimed:
                if refuse(f"ignored {type(event).__name__.lower()} before start"):
                    return
                continue
            call, replaced = claimed[0]
            if replaced.is_set():  # a newer stream carries the call now
                return
            if event.stream_sid != call.stream_sid:
                if refuse(f"ignored a message for stream {event.stream_sid:.40}"):
                    return
                continue
            await call.handle(event)
            if call.done.is_set():
                return
    finally:
        for watcher in watchers:
            watcher.cancel()
        finished.set()


def _sender(
    call: Call, write: Callable[[str], Awaitable[None]]
) -> Callable[[str], Awaitable[None]]:
    """Writes to Twilio, giving up on a socket that stopped taking data or failed (the call
    ends). It never raises: the model's event pump sends through it, and an error there would
    count as the live session failing."""
    dead = False

    async def send(text: str) -> None:
        nonlocal dead
        if dead:
            return
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await write(text)
        except TimeoutError:
            dead = True
            log.warning(
                "call %s: Twilio stopped reading for %.0f s", call.info.call_sid, SEND_TIMEOUT_S
            )
            call.end("Twilio socket stalled", Outcome.STREAM_ERROR)
        except Exception as exc:  # the caller's leg failed: never blame (and restart) the model
            dead = True
            log.warning("call %s: sending to Twilio failed: %r", call.info.call_sid, exc)
            call.end("Twilio socket failed", Outcome.STREAM_ERROR)

    return send


async def _set_when(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()
