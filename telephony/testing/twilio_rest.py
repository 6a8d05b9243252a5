"""A stand-in for Twilio's REST API that also plays the far end of the calls it places, so
outbound calls run end to end offline.

It serves the Calls resource of API version 2010-04-01 over loopback HTTP, as the official
`twilio` client expects (point it there with `client.api.base_url = service.base_url`):
`POST .../Calls.json` places a call, `GET .../Calls/{sid}.json` fetches one and
`POST .../Calls/{sid}.json` with `Status=completed` or `canceled` hangs one up. Requests are
authenticated as Twilio does (HTTP Basic with the account's SID and auth token, or an API
key's SID and secret), checked as Twilio checks them, and answered with Twilio's JSON, its
errors included (see `ERRORS`). Every request is recorded in `service.requests`.

Each call then goes as it would on Twilio: `initiated`, `ringing`, and what the far end does
(`FarEnd`, set per number): a person or a machine answers after the ring, the line is busy,
nobody answers before the call's `Timeout`, or the call fails. Status callbacks are sent for
the events the call asked for, in order, each after Twilio's processing delay, signed with
the account's auth token; one that fails is recorded and not retried, as Twilio does. On
answer the call's `Url` is requested (or its inline `Twiml` taken) and carried out by the
caller simulator (`simulator.answer_call`), which is then the far end: the test makes it
speak, and reads what it heard, through `service.calls[sid].sim`. Answering machine
detection decides from what the far end says: a person's short "hello" and the silence after
it, a machine's long greeting and its beep. A machine records what it hears after its beep
(`OutboundCall.message()`). When the TwiML runs out, the call completes.

Status callbacks arrive in the order the events happened (Twilio only says they may not);
Twilio's synchronous AMD (without `AsyncAmd=true`) holds the webhook until it decides and
sends `AnsweredBy` with it. What is not simulated: redirecting a live call (`Url`/`Twiml` on
an update answers 501), listing calls, `SendDigits`, `Method=GET` for the webhook,
recordings, and any other resource."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import functools
import hashlib
import itertools
import json
import math
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
from websockets.exceptions import InvalidHandshake

from ..audio import mulaw_encode
from ..twilio.signatures import SignatureChecker
from .gemini_live import voiced_audio
from .simulator import CallerSimulator, CallOver, WebhookError, answer_call
from .standin import LoopbackService, in_thread

if TYPE_CHECKING:
    from ..server.serving import Server

__all__ = [
    "ACCOUNT_SID",
    "AUTH_TOKEN",
    "ERRORS",
    "FROM_NUMBER",
    "ApiRequest",
    "Callback",
    "CallEvent",
    "FarEnd",
    "OutboundCall",
    "TwilioRestService",
    "beep",
    "running_in_thread",
]

T = TypeVar("T")
ACCOUNT_SID = "AC" + "5" * 32
AUTH_TOKEN = "standin-auth-token"
FROM_NUMBER = "+15550100000"
"""The account's one number, unless the service is given others."""
API_VERSION = "2010-04-01"
STATUS_EVENTS = ("initiated", "ringing", "answered", "completed")
FINAL = ("completed", "busy", "no-answer", "failed", "canceled")
AMD_MODES = ("Enable", "DetectMessageEnd")
_E164 = re.compile(r"\+[1-9]\d{6,14}")
_CALLS = re.compile(rf"/{API_VERSION}/Accounts/([^/]+)/Calls(?:/([^/]+))?\.json")

ERRORS: dict[int, tuple[int, str]] = {
    20003: (401, "Authenticate"),
    20004: (405, "Method not allowed"),
    20404: (404, "The requested resource {path} was not found"),
    20429: (429, "Too Many Requests"),
    20500: (500, "Internal Server Error"),
    20503: (503, "Service Unavailable"),
    21201: (400, "No 'To' number is specified"),
    21205: (
        400,
        "Url parameter is required. For more information, see https://www.twilio.com/docs/api/twiml",
    ),
    21210: (
        400,
        "The source phone number provided, {value}, is not yet verified for your account. You"
        " may only make calls from phone numbers that you've verified or purchased from Twilio.",
    ),
    21211: (400, "Invalid 'To' Phone Number: {value}"),
    21212: (400, "Invalid From Number (caller ID): {value}"),
    21213: (400, "No 'From' number is specified"),
    21626: (400, "Invalid 'StatusCallbackEvent': {value}"),
}
"""Twilio's error codes the stand-in answers with: HTTP status and message (Twilio's wording
where it is known from its documentation and from answers quoted in public bug reports)."""
_DEFAULT_CODES = {401: 20003, 404: 20404, 429: 20429, 500: 20500, 503: 20503}

SPEECH_THRESHOLD_MS = 2400
"""AMD's defaults (Twilio's `MachineDetection*` parameters): speech longer than this is a
machine's;"""
SPEECH_END_THRESHOLD_MS = 1200
"""this much silence after speech ends it;"""
SILENCE_TIMEOUT_MS = 5000
"""this much silence from the answer gives `unknown`;"""
AMD_TIMEOUT_S = 30
"""and AMD gives up (`unknown`) after this."""
BEEP_DETECT_S = 0.1
"""How long after a beep ends AMD reports `machine_end_beep`."""
GAP_BEFORE_BEEP_S = 0.3


Answer = Literal["human", "machine", "busy", "no-answer", "failed"]
"""What happens at the number called: a person or a machine answers, the line is busy,
nobody answers, or the call cannot be connected."""


@functools.cache
def beep(seconds: float = 0.5, hz: float = 1000.0) -> bytes:
    """An answering machine's beep (8 kHz mu-law): a steady tone, what AMD listens for."""
    t = np.arange(int(seconds * 8000)) / 8000
    pcm = np.round(0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2")
    return mulaw_encode(pcm.tobytes())


@functools.cache
def _voice(seconds: float) -> bytes:
    return mulaw_encode(voiced_audio(seconds, rate=8000))


@dataclass(frozen=True)
class FarEnd:
    """Who or what is at the number called, and how the call goes there.

    It rings for `ring_s` before the answer (or before the busy signal). Once answered, the
    far end says its `greeting` (8 kHz mu-law) as the stream opens: by default a person says
    a short "hello" (0.6 s of voice; `b""` for one who says nothing) and a machine a 2.5 s
    message, then (with `beep`) a beep, after which it records. AMD judges by that, as
    Twilio's does; `answered_by` forces its verdict (e.g. `fax`) and `amd_s` its time
    (seconds from the answer)."""

    answer: Answer = "human"
    ring_s: float = 1.0
    greeting: bytes | None = None
    beep: bool = True
    answered_by: str | None = None
    amd_s: float | None = None

    def __post_init__(self) -> None:
        if self.ring_s < 0 or (self.amd_s is not None and self.amd_s < 0):
            raise ValueError("far-end delays cannot be negative")

    @property
    def said(self) -> bytes:
        """The greeting alone."""
        if self.greeting is not None:
            return self.greeting
        return _voice(2.5) if self.answer == "machine" else _voice(0.6)

    @property
    def speech(self) -> bytes:
        """All it says on answer: the greeting, and a machine's beep."""
        if self.answer == "machine" and self.beep:
            return self.said + b"\xff" * int(GAP_BEFORE_BEEP_S * 8000) + beep()
        return self.said


def _amd(far: FarEnd, params: Mapping[str, str], mode: str) -> tuple[str, float]:
    """AMD's verdict on `far`, and when it comes (seconds from when the far end starts
    speaking), from the call's `MachineDetection*` parameters: long speech is a machine's
    (`machine_start` at once with `Enable`; with `DetectMessageEnd` once its beep, or the
    silence after it, ends the message); short speech and the silence after it a person's;
    no speech at all is `unknown`."""

    def seconds(name: str, default_ms: int) -> float:
        return int(params.get(name) or default_ms) / 1000

    threshold = seconds("MachineDetectionSpeechThreshold", SPEECH_THRESHOLD_MS)
    speech_end = seconds("MachineDetectionSpeechEndThreshold", SPEECH_END_THRESHOLD_MS)
    silence = seconds("MachineDetectionSilenceTimeout", SILENCE_TIMEOUT_MS)
    give_up = float(params.get("MachineDetectionTimeout") or AMD_TIMEOUT_S)
    said = len(far.said) / 8000
    if not said:
        verdict, at = "unknown", silence
    elif said < threshold:
        verdict, at = "human", said + speech_end
    elif mode == "Enable":
        verdict, at = "machine_start", threshold
    elif far.answer == "machine" and far.beep:
        verdict, at = "machine_end_beep", len(far.speech) / 8000 + BEEP_DETECT_S
    else:
        verdict, at = "machine_end_silence", said + speech_end
    verdict = far.answered_by or verdict
    at = far.amd_s if far.amd_s is not None else at
    return ("unknown", give_up) if at > give_up else (verdict, at)


@dataclass(frozen=True)
class ApiRequest:
    """One request to the REST API as it came (`form` keeps repeated keys, in order) and the
    status it was answered with. `credential` is the Basic user name: an AccountSid or an API
    key's SID ("" without)."""

    method: str
    path: str
    form: dict[str, list[str]]
    credential: str
    status: int


@dataclass(frozen=True)
class Callback:
    """A status or AMD callback the service made for a call, and the application's answer
    (`status` 0: no answer at all)."""

    at: float
    kind: Literal["status", "amd"]
    method: str
    url: str
    form: dict[str, str]
    signature: str
    status: int


@dataclass(frozen=True)
class CallEvent:
    """Something that happened to a call, at a loop time of the service's."""

    at: float
    what: str
    detail: str = ""


def _rfc2822(moment: datetime | None) -> str | None:
    return email.utils.format_datetime(moment) if moment is not None else None


@dataclass
class OutboundCall:
    """A call the service placed, as it goes. `sim` is the far end once it has answered and
    the stream opened (and stays, with its log, after the call)."""

    sid: str
    account_sid: str
    to: str
    from_: str
    params: dict[str, list[str]]
    """The create request's form."""
    far_end: FarEnd
    created: datetime
    status: str = "queued"
    events: list[CallEvent] = field(default_factory=list)
    callbacks: list[Callback] = field(default_factory=list)
    sim: CallerSimulator | None = None
    answered_by: str | None = None
    answered_at: float | None = None
    ended_at: float | None = None
    recording_from: float | None = None
    """When a machine started recording (its beep's end, or its greeting's)."""
    failure: Exception | None = None
    """TwiML the simulator could not follow, or what went wrong in the stand-in itself."""
    updated: datetime | None = None
    started: datetime | None = None
    ended: datetime | None = None
    pending: int = 0
    """Status callbacks queued and not yet made."""
    hangup: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by a REST request that ends the call."""
    sequence: itertools.count[int] = field(default_factory=itertools.count)
    last_callback: asyncio.Task[None] | None = None
    """The status callback the next one goes out after."""

    def param(self, name: str) -> str:
        """The create request's value for `name` (the first, if repeated), or ""."""
        return self.params.get(name, [""])[0]

    @property
    def status_events(self) -> list[str]:
        """The status callbacks asked for (`completed` alone by default, as on Twilio)."""
        return self.params.get("StatusCallbackEvent") or ["completed"]

    @property
    def settled(self) -> bool:
        """Over, and every status callback made."""
        return self.status in FINAL and not self.pending

    @property
    def duration(self) -> int:
        """Seconds from the answer to the end (0 for a call never answered)."""
        if self.answered_at is None or self.ended_at is None:
            return 0
        return round(self.ended_at - self.answered_at)

    def message(self) -> np.ndarray:
        """What a machine recorded, 8 kHz int16: all the far end heard after its beep."""
        if self.sim is None or self.recording_from is None:
            return np.zeros(0, np.int16)
        log = self.sim.log
        skip = max(0, round((self.recording_from - log.started) * 8000))
        return log.heard_pcm()[skip:]

    def resource(self) -> dict[str, Any]:
        """The Call resource as Twilio's REST API represents it."""
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{self.sid}"
        return {
            "account_sid": self.account_sid,
            "annotation": None,
            "answered_by": self.answered_by,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": _rfc2822(self.created),
            "date_updated": _rfc2822(self.updated or self.created),
            "direction": "outbound-api",
            "duration": str(self.duration) if self.status in FINAL else None,
            "end_time": _rfc2822(self.ended),
            "forwarded_from": None,
            "from": self.from_,
            "from_formatted": self.from_,
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": None,
            "price": None,
            "price_unit": "USD",
            "queue_time": "0",
            "sid": self.sid,
            "start_time": _rfc2822(self.started),
            "status": self.status,
            "subresource_uris": {
                name: f"{uri}/{title}.json"
                for name, title in (
                    ("notifications", "Notifications"),
                    ("recordings", "Recordings"),
                    ("payments", "Payments"),
                    ("events", "Events"),
                    ("siprec", "Siprec"),
                    ("streams", "Streams"),
                    ("transcriptions", "Transcriptions"),
                    ("user_defined_message_subscriptions", "UserDefinedMessageSubscriptions"),
                    ("user_defined_messages", "UserDefinedMessages"),
                )
            },
            "to": self.to,
            "to_formatted": self.to,
            "trunk_sid": None,
            "uri": uri + ".json",
        }


def _body(status: int, code: int, message: str) -> tuple[int, dict[str, Any]]:
    """An error as Twilio's 2010-04-01 API answers it."""
    return status, {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


def _error(code: int, message: str = "", **values: str) -> tuple[int, dict[str, Any]]:
    status, template = ERRORS[code]
    return _body(status, code, message or template.format(**values))


def _basic(header: str) -> tuple[str, str]:
    """The user name and password of an HTTP Basic `Authorization` header ("" for none)."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return "", ""
    try:
        user, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    return user, secret


def _first(form: Mapping[str, list[str]], name: str) -> str:
    return form.get(name, [""])[0]


def _is_number(value: str) -> bool:
    return bool(_E164.fullmatch(value)) or value.startswith(("sip:", "client:"))


def _is_url(value: str) -> bool:
    parts = urllib.parse.urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _stream_url(twiml: str) -> str:
    """The first `<Stream url>` of inline TwiML (where its streams are to be opened)."""
    with contextlib.suppress(ET.ParseError):
        stream = ET.fromstring(twiml).find(".//Stream")
        if stream is not None:
            return stream.get("url", "")
    return ""


def _send(url: str, data: bytes | None, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


class TwilioRestService(LoopbackService):
    """Twilio's REST API (Calls) and the far ends of its calls, on a loopback port (see the
    module's docstring).

    The account is `account_sid` with `auth_token` (which also signs the callbacks), plus any
    `api_keys` (SID to secret); calls may come from its `numbers`. `far_ends` says who is at
    which number (others get `default`). `reach` maps a public origin the application gave
    (`https://voice.example`) to where it really listens (`http://127.0.0.1:8080`): requests
    are signed for the URL given and sent there. `latency_s` is Twilio's own pace: from the
    queue to dialling, from dialling to ringing, and before each status callback.

    Use as `async with TwilioRestService() as service:`, or `running_in_thread()`. The calls
    and their simulators live on the service's loop: `run()` reaches them from any loop."""

    WAIT_S = 10.0
    """Far ends ring and AMD listens: waits take longer than with the Gemini stand-in."""

    def __init__(
        self,
        *,
        account_sid: str = ACCOUNT_SID,
        auth_token: str = AUTH_TOKEN,
        api_keys: Mapping[str, str] | None = None,
        numbers: tuple[str, ...] = (FROM_NUMBER,),
        far_ends: Mapping[str, FarEnd] | None = None,
        default: FarEnd = FarEnd(),
        reach: Mapping[str, str] | None = None,
        latency_s: float = 0.1,
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.api_keys = dict(api_keys or {})
        self.numbers = set(numbers)
        self.far_ends = dict(far_ends or {})
        self.default = default
        self.reach = {
            origin.rstrip("/"): local.rstrip("/") for origin, local in (reach or {}).items()
        }
        self.latency_s = latency_s
        self.requests: list[ApiRequest] = []
        self.calls: dict[str, OutboundCall] = {}
        self.port = 0
        self._failures: deque[tuple[int, dict[str, Any]]] = deque()
        self._ids = itertools.count(1)
        self._signer = SignatureChecker(auth_token, "http://localhost")
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._serving: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        """What to set the twilio client's `client.api.base_url` to."""
        return f"http://127.0.0.1:{self.port}"

    def fail_next(self, status: int, code: int | None = None, message: str = "") -> None:
        """The next call creation fails with HTTP `status` and Twilio error `code` (by default
        Twilio's for that status: 20429 for a 429, 20500 for a 500...), before any check."""
        code = code or _DEFAULT_CODES.get(status, status)
        message = message or ERRORS.get(code, (status, HTTPStatus(status).phrase))[1]
        self._failures.append(_body(status, code, message))

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Runs `work` (e.g. `sim.say(audio)`) on the service's loop, where the calls live,
        and waits for it from whichever loop the caller is on."""
        if self._loop is None:
            raise RuntimeError("the service is not started")
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is self._loop:
                return await work
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self._loop))

    async def start(self) -> None:
        from quart import Quart

        from ..server.serving import DEFAULTS, Server, server_config

        self._loop = asyncio.get_running_loop()
        app = Quart(__name__)
        app.route("/<path:path>", methods=["GET", "POST", "DELETE"])(self._serve)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        self.port = listener.getsockname()[1]
        options = {**DEFAULTS, "timeout_graceful_shutdown": 1}
        self._server = Server(server_config(app, "127.0.0.1", self.port, options))
        self._serving = asyncio.create_task(self._server.serve(sockets=[listener]))

    async def stop(self) -> None:
        """Ends every call still going (their simulators close), then the server."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None and self._serving is not None:
            self._server.should_exit = True
            await self._serving
            self._serving = None

    # --- the REST API ---------------------------------------------------------------------

    async def _serve(self, path: str) -> tuple[str, int, dict[str, str]]:
        from quart import request

        form = await request.form
        fields = {name: form.getlist(name) for name in form}
        credential, secret = _basic(request.headers.get("Authorization", ""))
        status, body = self._answer(request.method, request.path, fields, credential, secret)
        self.requests.append(ApiRequest(request.method, request.path, fields, credential, status))
        return json.dumps(body), status, {"Content-Type": "application/json"}

    def _answer(
        self, method: str, path: str, form: dict[str, list[str]], credential: str, secret: str
    ) -> tuple[int, dict[str, Any]]:
        secrets = {self.account_sid: self.auth_token, **self.api_keys}
        if not credential or secrets.get(credential) != secret:
            return _error(20003)
        match = _CALLS.fullmatch(path)
        if match is None or match[1] != self.account_sid:
            return _error(20404, path=path)
        if match[2] is None:
            if method != "POST":
                return _error(20004)
            if self._failures:
                return self._failures.popleft()
            return self._create(form)
        call = self.calls.get(match[2])
        if call is None:
            return _error(20404, path=path)
        if method == "GET":
            return 200, call.resource()
        if method == "POST":
            return self._update(call, form)
        return _error(20004)

    def _create(self, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        to, from_, url = _first(form, "To"), _first(form, "From"), _first(form, "Url")
        if not to:
            return _error(21201)
        if not from_:
            return _error(21213)
        if not _is_number(to):
            return _error(21211, value=to)
        if not _is_number(from_):
            return _error(21212, value=from_)
        if from_ not in self.numbers:
            return _error(21210, value=from_)
        if not url and not _first(form, "Twiml"):
            return _error(21205)
        if url and not _is_url(url):
            return _error(21205, f"Url is not a valid URL: {url}")
        if bad := [e for e in form.get("StatusCallbackEvent", []) if e not in STATUS_EVENTS]:
            return _error(21626, value=bad[0])
        number = next(self._ids)
        sid = "CA" + hashlib.sha256(f"{self.account_sid}/{number}".encode()).hexdigest()[:32]
        now = datetime.now(UTC).replace(microsecond=0)
        far_end = self.far_ends.get(to, self.default)
        call = OutboundCall(sid, self.account_sid, to, from_, form, far_end, now)
        self.calls[sid] = call
        self._event(call, "queued")
        self._spawn(self._progress(call))
        return 201, call.resource()

    def _update(self, call: OutboundCall, form: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        if _first(form, "Url") or _first(form, "Twiml"):
            return _body(501, 20500, "the Twilio stand-in does not redirect live calls")
        wanted = _first(form, "Status")
        if call.status not in FINAL and wanted in ("completed", "canceled"):
            if call.status in ("queued", "ringing"):
                self._finish(call, "canceled")
                call.hangup.set()
            elif wanted == "completed":  # canceling an answered call does nothing
                self._finish(call, "completed")
                call.hangup.set()
        return 200, call.resource()

    # --- the call -------------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _event(self, call: OutboundCall, what: str, detail: str = "") -> None:
        call.events.append(CallEvent(self._now(), what, detail))

    def _set_status(self, call: OutboundCall, status: str) -> None:
        call.status = status
        call.updated = datetime.now(UTC).replace(microsecond=0)

    async def _pause(self, call: OutboundCall, seconds: float) -> bool:
        """Waits `seconds`; True if the call was hung up (by a REST request) meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await call.hangup.wait()
        return call.hangup.is_set()

    async def _progress(self, call: OutboundCall) -> None:
        try:
            await self._dial(call)
        except Exception as exc:  # noqa: BLE001 - a fault of the stand-in's: kept for the test
            call.failure = call.failure or exc
            self._event(call, "stand-in error", repr(exc))
            self._finish(call, "failed")

    async def _dial(self, call: OutboundCall) -> None:
        """The call from the queue to its end, as the far end has it go."""
        far = call.far_end
        if await self._pause(call, self.latency_s):
            return
        self._event(call, "initiated")
        self._status_callback(call, "initiated", "initiated")
        if far.answer == "failed":
            self._finish(call, "failed")
            return
        if await self._pause(call, self.latency_s):
            return
        if far.answer == "busy":
            if not await self._pause(call, far.ring_s):
                self._finish(call, "busy")
            return
        self._set_status(call, "ringing")
        self._event(call, "ringing")
        self._status_callback(call, "ringing", "ringing")
        timeout = float(call.param("Timeout") or 60)
        if far.answer == "no-answer" or far.ring_s >= timeout:
            if not await self._pause(call, timeout):
                self._finish(call, "no-answer")
            return
        if await self._pause(call, far.ring_s):
            return
        self._set_status(call, "in-progress")
        call.answered_at = self._now()
        call.started = datetime.now(UTC).replace(microsecond=0)
        self._event(call, "answered", far.answer)
        self._status_callback(call, "answered", "in-progress")
        await self._answered(call)
        self._finish(call, "completed")

    async def _answered(self, call: OutboundCall) -> None:
        """From the answer to the end of the TwiML (or a hang-up): AMD, the call's webhook,
        and the far end on the streams the TwiML opens."""
        mode = call.param("MachineDetection")
        params = {name: call.param(name) for name in call.params}
        amd = _amd(call.far_end, params, mode) if mode in AMD_MODES else None
        background = amd is not None and call.param("AsyncAmd").lower() == "true"
        form = _standard(call) | {"CallStatus": "in-progress"}
        if amd is not None and not background:  # Twilio holds the webhook until AMD decides
            verdict, at = amd
            if await self._pause(call, at):
                return
            call.answered_by = verdict
            form |= {"AnsweredBy": verdict, "MachineDetectionDuration": str(round(at * 1000))}
        url, twiml = call.param("Url"), ""
        if not url:
            twiml = call.param("Twiml")
        self._event(call, "webhook", url or "inline TwiML")
        try:
            async with answer_call(
                self._origin(url or _stream_url(twiml)),
                form=form,
                url=url,
                twiml=twiml,
                auth_token=self.auth_token,
            ) as sim:
                call.sim = sim
                self._event(call, "stream", sim.stream_sid)
                speaks = amd is None or background  # else AMD heard the greeting already
                speaking = asyncio.create_task(
                    self._far_end(call, sim, amd if background else None, speaks)
                )
                ended = asyncio.create_task(sim.closed.wait())
                hung_up = asyncio.create_task(call.hangup.wait())
                await asyncio.wait([ended, hung_up], return_when=asyncio.FIRST_COMPLETED)
                for task in (speaking, ended, hung_up):
                    task.cancel()
                await asyncio.gather(speaking, ended, hung_up, return_exceptions=True)
                if call.hangup.is_set() and not sim.closed.is_set():
                    await sim.hang_up()  # Twilio's stop, then the stream closes
                self._event(call, "far end", sim.log.ended or "")
        except WebhookError as exc:
            if exc.status == 200:  # TwiML the simulator cannot follow: the test must know
                call.failure = exc
            self._event(call, "application error", str(exc))
        except InvalidHandshake as exc:  # the application refused the stream
            call.failure = exc
            self._event(call, "stream refused", repr(exc))
        except OSError as exc:
            self._event(call, "application error", repr(exc))

    async def _far_end(
        self, call: OutboundCall, sim: CallerSimulator, amd: tuple[str, float] | None, speaks: bool
    ) -> None:
        """The far end on the stream: it says its greeting (unless AMD held the webhook while
        it did) and a machine records after it; with AMD in the background, its verdict
        comes as long after the far end began speaking as it takes."""
        far = call.far_end
        start = self._now()
        if speaks and far.speech:
            try:
                start = await sim.say(far.speech)
            except CallOver:
                return
        if far.answer == "machine":
            call.recording_from = start + len(far.speech) / 8000 if speaks else start
        if amd is None:
            return
        verdict, at = amd
        await asyncio.sleep(max(0.0, start + at - self._now()))
        call.answered_by = verdict
        self._event(call, "amd", verdict)
        if url := call.param("AsyncAmdStatusCallback"):
            assert call.answered_at is not None
            form = {
                "AccountSid": call.account_sid,
                "AnsweredBy": verdict,
                "CallSid": call.sid,
                "MachineDetectionDuration": str(round((self._now() - call.answered_at) * 1000)),
            }
            method = call.param("AsyncAmdStatusCallbackMethod") or "POST"
            await self._callback(call, "amd", url, form, method)

    def _finish(self, call: OutboundCall, status: str) -> None:
        """The call is over (the first reason stands): the `completed` callback, with its
        duration in seconds and in billed minutes."""
        if call.status in FINAL:
            return
        call.ended_at = self._now()
        call.ended = datetime.now(UTC).replace(microsecond=0)
        self._set_status(call, status)
        self._event(call, status)
        seconds = call.duration
        minutes = max(1, math.ceil(seconds / 60)) if call.answered_at is not None else 0
        extra = {"CallDuration": str(seconds), "Duration": str(minutes)}
        self._status_callback(call, "completed", status, extra)

    def _status_callback(
        self, call: OutboundCall, event: str, status: str, extra: Mapping[str, str] | None = None
    ) -> None:
        """Queues the status callback for `event` if the call asked for it: they go out in
        the order the events happened, each after Twilio's processing delay."""
        url = call.param("StatusCallback")
        if not url or event not in call.status_events:
            return
        form = _standard(call) | {
            "CallStatus": status,
            "Timestamp": email.utils.format_datetime(datetime.now(UTC).replace(microsecond=0)),
            "SequenceNumber": str(next(call.sequence)),
            "CallbackSource": "call-progress-events",
            **(extra or {}),
        }
        call.pending += 1
        call.last_callback = self._spawn(self._deliver(call, url, form, call.last_callback))

    async def _deliver(
        self,
        call: OutboundCall,
        url: str,
        form: dict[str, str],
        after: asyncio.Task[None] | None,
    ) -> None:
        try:
            if after is not None:
                await asyncio.wait([after])
            await asyncio.sleep(self.latency_s)
            method = call.param("StatusCallbackMethod") or "POST"
            await self._callback(call, "status", url, form, method)
        finally:
            call.pending -= 1

    async def _callback(
        self,
        call: OutboundCall,
        kind: Literal["status", "amd"],
        url: str,
        form: dict[str, str],
        method: str,
    ) -> None:
        """One request to the application, signed as Twilio signs it (a GET's parameters are
        in its URL), recorded with the answer and never retried."""
        method = method.upper()
        data = None
        target = url
        if method == "GET":
            target += ("&" if "?" in url else "?") + urllib.parse.urlencode(form)
            signature = self._signer.sign(target, {})
        else:
            data = urllib.parse.urlencode(form).encode()
            signature = self._signer.sign(url, form)
        headers = {"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1"}
        if data is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        at = self._now()
        status = await asyncio.to_thread(_send, self._local(target), data, headers)
        call.callbacks.append(Callback(at, kind, method, url, form, signature, status))

    def _origin(self, url: str) -> str:
        """Where the service really sends what is for `url`'s origin (ws: as http:)."""
        parts = urllib.parse.urlsplit(url)
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
        origin = f"{scheme}://{parts.netloc}"
        return self.reach.get(origin, origin)

    def _local(self, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        return self._origin(url) + urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))


def _standard(call: OutboundCall) -> dict[str, str]:
    """The parameters Twilio sends in every request about a call."""
    return {
        "AccountSid": call.account_sid,
        "ApiVersion": API_VERSION,
        "CallSid": call.sid,
        "Called": call.to,
        "Caller": call.from_,
        "Direction": "outbound-api",
        "From": call.from_,
        "To": call.to,
    }


@contextmanager
def running_in_thread(**options: Any) -> Iterator[TwilioRestService]:
    """The service (`TwilioRestService(**options)`) on its own event loop in a daemon
    thread; its calls' simulators live there (reach them with `service.run()`)."""
    with in_thread(TwilioRestService(**options), "twilio-rest-standin") as service:
        yield service
