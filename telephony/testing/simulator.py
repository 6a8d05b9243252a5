"""The Twilio side of a call, for tests and local runs: a caller simulator that speaks the real
protocol. It posts the signed voice webhook, follows the TwiML to the Media Stream, streams
caller audio in real time (20 ms frames), plays agent audio at 8,000 bytes/s as Twilio would,
echoes marks once their audio has played and honours `clear`.

Real lines are messier, and each of these can be switched on (all are off by default, and off
the simulator behaves exactly as without them):

- `Network`: one-way delay and jitter between Twilio's media edge and the server, each way.
- `Echo`: the handset or speakerphone sends back what the caller hears, quieter and later.
- `Interjection` / `backchannel()` / `cough()`: the caller says "mm-hm" or coughs while the
  agent talks, as callers do.
- `press_keys()`: keys pressed in quick succession.

The interjection clips ship in `assets/` (8 kHz mono mu-law, headerless); they were made once
with espeak-ng 1.51 and SoX 14.4 (tests never run either; `[[...]]` is espeak's phoneme input,
as it spells the text "mm-hm" out letter by letter):

    espeak-ng -v en-us -s 160 "[[m-'hm]]" -w mmhm.wav
    sox -R mmhm.wav -r 8000 -c 1 -e mu-law -t raw mmhm.ulaw \\
        silence 1 0.01 1% reverse silence 1 0.01 1% reverse norm -6
    sox -R -n -r 8000 -c 1 -e mu-law -t raw cough.ulaw \\
        synth 0.15 pinknoise fade q 0.004 0.15 0.13 sinc 150-3400 norm -8.5

The mm-hm is 383 ms of voiced hum with the dip of its "h"; the cough is 150 ms of band-limited
noise with a 4 ms attack and a decaying tail. Both sit at speech level (RMS about 3,000) and
both make WebRTC's VAD (and the bridge's detector) report speech, as real ones do.

It reaches the server over the network (`place_call(url)`) or in-process through the ASGI app
(`place_call(app=app)`), which is what lets a replay run on a virtual clock. A call the server
placed itself (through Twilio's REST API) starts with `answer_call()` instead: the simulator is
then whoever answered, from the call's webhook on (the REST stand-in, `twilio_rest`, uses it).

When the server closes the stream, the simulator goes on with the call as Twilio does: it
requests the `<Connect>`'s `action` URL (signed, with the call's standard parameters) and
carries out the TwiML it gets, or without an action the verbs after the `<Connect>`.
`<Say>` and `<Play digits>` take their time and are logged, `<Dial>` logs the transfer,
`<Hangup/>` or running out of verbs ends the call, and another `<Connect><Stream>` opens a new
stream for the same call, on which the same `CallerSimulator` carries on. Audio still to play
when the stream ended is lost then, as on Twilio. The dialled call is not simulated: it never
ends, so what Twilio would do after it (the verbs after `<Dial>`, its `action`) never happens.
TwiML the simulator cannot follow fails the test when `place_call` exits."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
import random
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, Protocol

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from ..audio import mulaw_decode, mulaw_encode
from ..twilio.media_stream import (
    Clear,
    Connected,
    Dtmf,
    Mark,
    Media,
    OutboundEvent,
    PlayMark,
    PlayMedia,
    Start,
    Stop,
    parse_outbound,
)
from ..twilio.signatures import SignatureChecker

__all__ = [
    "DIGITS",
    "SOUNDS",
    "ActionRequest",
    "CallLog",
    "CallOver",
    "CallerSimulator",
    "Echo",
    "Ending",
    "Heard",
    "Interjection",
    "Network",
    "StreamSocket",
    "WebhookError",
    "answer_call",
    "place_call",
    "sound",
]

FRAME_BYTES = 160
FRAME_S = 0.02
SILENCE = b"\xff" * FRAME_BYTES
DIGITS = "0123456789*#"
"""The keys a phone sends as DTMF."""
SOUNDS = {"mm-hm": "mmhm.ulaw", "cough": "cough.ulaw"}
"""Interjections that ship with the package, by name (files in `assets/`)."""
REPLY_GAP_S = 0.3
"""Agent audio separated by less than this is one reply (as `timeline.TURN_GAP_S` counts)."""
KEY_S = 0.5
"""How long `<Play digits>` takes per key, and per `w` (a `W` waits 1 s): a fair bound on
Twilio's pace."""
SAY_S_PER_CHAR = 0.06
"""How long `<Say>` takes per character of its text."""
ACTION_FIELDS = ("CallSid", "AccountSid", "From", "To", "Direction")
"""The webhook's fields Twilio sends again, with `CallStatus`, when it requests an action URL."""
Ending = Literal["caller", "hangup", "dial", "application error", "stream error", "simulator error"]
"""How a call ended: the caller hung up (`hang_up()`, or leaving `place_call`); Twilio hung up
as the TwiML said (`<Hangup/>`, or no verbs left, as after a stream whose `<Connect>` has no
action); the caller was transferred (`<Dial>`); an action URL answered with an error; the
stream broke on the simulator's side (a message it could not read); or the simulator met TwiML
it cannot follow."""


@functools.cache
def sound(name: str) -> bytes:
    """A shipped interjection clip (8 kHz mu-law), by its name in `SOUNDS`."""
    if name not in SOUNDS:
        raise ValueError(f"no sound {name!r}; there are {', '.join(SOUNDS)}")
    return (resources.files(__package__) / "assets" / SOUNDS[name]).read_bytes()


@dataclass(frozen=True)
class Network:
    """The path between Twilio's media edge and the server, the same each way.

    Every message takes `delay_s` plus a random extra of 0 to `jitter_s` (uniform, from a
    generator seeded with `seed`, so runs repeat): queueing only ever adds to the propagation
    delay. The path is one TCP connection, so a message never overtakes the one before it:
    jitter makes messages late and bunched, never reordered."""

    delay_s: float = 0.0
    jitter_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.delay_s < 0 or self.jitter_s < 0:
            raise ValueError("network delay and jitter cannot be negative")


@dataclass(frozen=True)
class Echo:
    """The caller's handset or speakerphone picking up what it plays: the agent audio the
    caller hears goes back up, `level_db` relative to how it was heard, `delay_s` later,
    added to whatever the caller says. It rides on the frames the simulator streams itself
    (every frame, when `continuous`), not on frames passed to `send_frame`."""

    level_db: float = -25.0
    delay_s: float = 0.15

    def __post_init__(self) -> None:
        if self.delay_s < 0:
            raise ValueError("echo delay cannot be negative")


@dataclass(frozen=True)
class Interjection:
    """The caller says `sound` (a name in `SOUNDS`) once, as soon as the agent has been
    audible to them for `after_agent_s` in one reply. A reply is agent audio that began
    after the caller last finished saying something (`say()`), pieces less than 300 ms apart
    counting as one; a greeting before the caller spoke is not a reply."""

    sound: str
    after_agent_s: float = 1.0

    def __post_init__(self) -> None:
        sound(self.sound)
        if self.after_agent_s < 0:
            raise ValueError("after_agent_s cannot be negative")


class CallOver(RuntimeError):
    """The caller spoke into a call that has ended."""


class WebhookError(RuntimeError):
    """The voice webhook did not answer with a usable <Connect><Stream>, or TwiML (the webhook's
    or an action URL's) asked for what the simulator cannot do."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"webhook answered {status}: {body[:200]}")
        self.status = status


@dataclass
class Heard:
    """One piece of agent audio as the caller heard it (cut short if a clear interrupted it)."""

    start: float
    audio: bytes
    received: float

    @property
    def end(self) -> float:
        return self.start + len(self.audio) / 8000


@dataclass(frozen=True)
class ActionRequest:
    """Twilio's request to a `<Connect>`'s action URL once its stream ended, and the answer."""

    at: float
    url: str
    form: dict[str, str]
    status: int
    """0 when no answer came at all (the server was unreachable)."""
    twiml: str


@dataclass
class CallLog:
    """What the Twilio side saw, with monotonic timestamps. With a `Network`, times are those
    at Twilio's end: when its messages left, when the server's arrived, when the caller
    heard what. It covers the whole call, over however many streams."""

    started: float = 0.0
    """When the call's first stream started (the origin of `heard_pcm`)."""
    streams: list[tuple[float, str]] = field(default_factory=list)
    """Each Media Stream of the call: when it started and its streamSid."""
    sent: list[tuple[float, bytes]] = field(default_factory=list)
    """Caller audio frames as sent (with any echo and interjections mixed in)."""
    media: list[tuple[float, int]] = field(default_factory=list)
    """Agent audio as it arrived: time and length in bytes."""
    clears: list[float] = field(default_factory=list)
    """When each clear arrived, which is when it cut what the caller heard."""
    marks_received: int = 0
    marks_echoed: int = 0
    heard: list[Heard] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)
    interjections: list[tuple[float, str]] = field(default_factory=list)
    """Onset of each interjection (when its first frame was sent) and what it was."""
    keys: list[tuple[float, str]] = field(default_factory=list)
    """Each DTMF key, when Twilio sent it."""
    actions: list[ActionRequest] = field(default_factory=list)
    said: list[str] = field(default_factory=list)
    """The text of each `<Say>`."""
    digits_played: list[str] = field(default_factory=list)
    """The keys of each `<Play digits>`, as the far end got them (without its `w`/`W` waits)."""
    transfers: list[str] = field(default_factory=list)
    """Each number or SIP address a `<Dial>` called."""
    ended: Ending | None = None
    """How the call ended, once it has."""

    def heard_pcm(self, until: float | None = None) -> np.ndarray:
        """The caller's earpiece as one 8 kHz int16 timeline from the first stream's start."""
        end = (
            until
            if until is not None
            else max((h.start + len(h.audio) / 8000 for h in self.heard), default=self.started)
        )
        out = np.zeros(max(0, int((end - self.started) * 8000)) + 1, np.int16)
        for h in self.heard:
            pcm = np.frombuffer(mulaw_decode(h.audio), np.int16)
            at = int((h.start - self.started) * 8000)
            n = max(0, min(len(pcm), len(out) - at))
            out[at : at + n] = pcm[:n]
        return out


async def _post_form(url: str, form: dict[str, str], headers: dict[str, str]) -> tuple[int, str]:
    def post() -> tuple[int, str]:
        data = urllib.parse.urlencode(form).encode()
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    return await asyncio.to_thread(post)


def _verbs(twiml: str) -> list[ET.Element]:
    try:
        root = ET.fromstring(twiml)
    except ET.ParseError as exc:
        raise WebhookError(200, f"not TwiML ({exc}): {twiml}") from exc
    if root.tag != "Response":
        raise WebhookError(200, f"TwiML is a <Response>, not <{root.tag}>: {twiml}")
    return list(root)


def _dialled(dial: ET.Element) -> list[str]:
    """Whom a `<Dial>` calls: its text, or each of its `<Number>` and `<Sip>` nouns."""
    nouns = list(dial)
    if bad := [noun.tag for noun in nouns if noun.tag not in ("Number", "Sip")]:
        raise WebhookError(200, f"the simulator dials numbers and SIP addresses, not <{bad[0]}>")
    targets = [(noun.text or "").strip() for noun in nouns or [dial]]
    if not all(targets):
        raise WebhookError(200, f"a <Dial> with nobody to call: {ET.tostring(dial, 'unicode')}")
    return targets


def _digits(play: ET.Element) -> str:
    """The `digits` of a `<Play digits>` (the simulator plays no audio files)."""
    digits = play.get("digits")
    if digits is None or (play.text or "").strip():
        raise WebhookError(200, f"the simulator only plays digits: {ET.tostring(play, 'unicode')}")
    if bad := set(digits) - set(DIGITS + "wW"):
        raise WebhookError(200, f"<Play digits> with {''.join(sorted(bad))!r}: not keys or waits")
    return digits


def _stream_sid(call_sid: str, n: int) -> str:
    """The streamSid of the call's `n`th stream (from 0): the first as before, then new ones."""
    if n == 0:
        return "MZ" + call_sid[2:]
    return "MZ" + hashlib.sha256(f"{call_sid}/{n}".encode()).hexdigest()[:32]


class StreamSocket(Protocol):
    """The Twilio end of a Media Stream WebSocket (a websockets client connection, or the
    in-process adapter)."""

    async def send(self, message: str) -> None: ...

    def __aiter__(self) -> AsyncIterator[str | bytes]: ...

    async def close(self) -> None: ...


class _AppSocket:
    """Quart's in-process test WebSocket, as a StreamSocket."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    async def send(self, message: str) -> None:
        await self._connection.send(message)

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        from quart.testing import WebsocketResponseError
        from quart.testing.connections import WebsocketDisconnectError

        while True:
            try:
                yield await self._connection.receive()
            except WebsocketDisconnectError:
                return
            except WebsocketResponseError as exc:
                raise WebhookError(exc.response.status_code, "stream upgrade refused") from exc

    async def close(self) -> None:
        await self._connection.close(1000)


class _Link:
    """One direction of a `Network`: when a message sent at a given time arrives."""

    def __init__(self, network: Network, direction: str) -> None:
        self._delay = network.delay_s
        self._jitter = network.jitter_s
        self._rng = random.Random(f"{network.seed}/{direction}")
        self._last = -math.inf

    def arrival(self, sent: float) -> float:
        self._last = max(self._last, sent + self._delay + self._rng.uniform(0, self._jitter))
        return self._last


class _Twilio:
    """How the simulated Twilio reaches the server for one call: requests and Media Streams,
    over the network to `base_url` or in-process to a Quart `app`, signed when there is an
    auth token. The streams stay open until `stack` closes (when `place_call` exits)."""

    def __init__(
        self,
        base_url: str,
        app: Any,
        signer: SignatureChecker | None,
        stack: contextlib.AsyncExitStack,
        fields: Mapping[str, str],
    ) -> None:
        self._base = base_url.rstrip("/")
        self._client = app.test_client() if app is not None else None
        self._signer = signer
        self._stack = stack
        self._fields = dict(fields)

    async def post(self, url: str, path: str, form: dict[str, str]) -> tuple[int, str]:
        """Posts `form` to `path` on the server, signed for `url` (where Twilio was told to)."""
        headers = {}
        if self._signer:
            headers["X-Twilio-Signature"] = self._signer.sign(url, form)
        if self._client is not None:
            response = await self._client.post(path, form=form, headers=headers)
            return response.status_code, await response.get_data(as_text=True)
        return await _post_form(self._base + path, form, headers)

    async def action(self, url: str) -> tuple[dict[str, str], int, str]:
        """Requests an action URL for the call in progress: the form, and the answer."""
        form = {name: self._fields[name] for name in ACTION_FIELDS} | {"CallStatus": "in-progress"}
        target = urllib.parse.urlsplit(url)
        path = (target.path or "/") + (f"?{target.query}" if target.query else "")
        return form, *await self.post(url, path, form)

    async def open_stream(self, url: str) -> StreamSocket | ClientConnection:
        """Opens the Media Stream TwiML named `url`, on the server Twilio reaches."""
        headers = {}
        if self._signer:
            headers["X-Twilio-Signature"] = self._signer.sign(url, {})
        path = urllib.parse.urlsplit(url).path
        if self._client is not None:
            connection = self._client.websocket(path, headers=headers)
            return _AppSocket(await self._stack.enter_async_context(connection))
        local = urllib.parse.urlsplit(self._base)
        scheme = "wss" if local.scheme == "https" else "ws"
        return await self._stack.enter_async_context(
            connect(
                urllib.parse.urlunsplit((scheme, local.netloc, path, "", "")),
                additional_headers=headers,
                max_size=2**20,
                compression=None,  # Twilio does not negotiate permessage-deflate
            )
        )


@dataclass(frozen=True)
class _Connect:
    """A `<Connect><Stream>` Twilio is carrying out, with what it does once the stream ends:
    request `action`, or without one go on with the verbs `after` it in its document."""

    stream_url: str
    parameters: dict[str, str]
    action: str
    after: list[ET.Element]
    url: str
    """The document's URL (relative URLs in it are relative to this)."""
    twilio: _Twilio

    @classmethod
    def parse(
        cls, verb: ET.Element, after: list[ET.Element], url: str, twilio: _Twilio
    ) -> _Connect:
        stream = verb.find("Stream")
        if stream is None or not stream.get("url"):
            raise WebhookError(200, f"no <Stream url=...> in {ET.tostring(verb, 'unicode')}")
        if verb.get("method", "POST").upper() != "POST":
            raise WebhookError(200, "the simulator requests action URLs with POST only")
        params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
        action = urllib.parse.urljoin(url, verb.get("action", "")) if verb.get("action") else ""
        return cls(stream.get("url", ""), params, action, after, url, twilio)

    @property
    def goes_on(self) -> bool:
        """Whether anything follows the stream (otherwise the call ends with it)."""
        return bool(self.action or self.after)


def _first_connect(twiml: str, url: str, twilio: _Twilio) -> _Connect:
    """The webhook's `<Connect><Stream>` (verbs before it are not simulated)."""
    verbs = _verbs(twiml)
    for n, verb in enumerate(verbs):
        if verb.tag == "Connect" and verb.find("Stream") is not None:
            return _Connect.parse(verb, verbs[n + 1 :], url, twilio)
    raise WebhookError(200, f"no <Connect><Stream url=...> in {twiml}")


class CallerSimulator:
    """One simulated call, on an open Media Stream and any the TwiML opens after it (see the
    module's docstring). Use `place_call()` to get one."""

    def __init__(
        self,
        ws: StreamSocket | ClientConnection,
        *,
        call_sid: str,
        parameters: dict[str, str],
        continuous: bool = True,
        clock: Callable[[], float] | None = None,
        network: Network | None = None,
        echo: Echo | None = None,
        interjections: Sequence[Interjection] = (),
        connect: _Connect | None = None,
        account_sid: str = "AC" + "0" * 32,
    ) -> None:
        self._ws = ws
        self.call_sid = call_sid
        self.account_sid = account_sid
        self.stream_sid = _stream_sid(call_sid, 0)
        self.parameters = parameters
        """The stream's custom parameters (Twilio sends them again on a new stream)."""
        self.continuous = continuous
        """Like real Twilio, send silence frames whenever the caller has nothing to say."""
        self._clock = clock or asyncio.get_running_loop().time
        self.log = CallLog()
        self._connect = connect
        """The TwiML verb that opened the stream (without it, the call ends with the stream)."""
        self.stream_url = connect.stream_url if connect is not None else ""
        """Where the TwiML told Twilio to open the stream."""
        self._stream_started = 0.0
        self._closed_by_server = False
        self._next: asyncio.Task[None] | None = None
        """Twilio carrying out the TwiML after a stream, until the next one opens."""
        self._failure: Exception | None = None
        """TwiML the simulator could not follow (`place_call` raises it)."""
        self._outgoing: deque[tuple[bytes, asyncio.Future[float] | None]] = deque()
        self._seq = 0
        self._chunk = 0
        self._play_end = 0.0
        self._pending_marks: deque[tuple[float, str]] = deque()
        self._mark_waiting = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = asyncio.Event()
        # Without a network (or with a perfect one) messages go straight through, as before.
        self._up: _Link | None = None
        self._down: _Link | None = None
        if network is not None and (network.delay_s or network.jitter_s):
            self._up, self._down = _Link(network, "up"), _Link(network, "down")
        self._uplink: asyncio.Queue[tuple[float, str] | None] = asyncio.Queue()
        self._downlink: asyncio.Queue[tuple[float, OutboundEvent] | None] = asyncio.Queue()
        self._uplink_task: asyncio.Task[None] | None = None
        self._media_due = 0.0
        self._echo = echo
        self._interjections = list(interjections)
        self._said_at: float | None = None
        self._overlay = np.zeros(0)
        self._onsets: list[tuple[asyncio.Future[float], str]] = []

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def _send(self, text: str) -> None:
        if self._up is None:
            await self._ws.send(text)
        else:
            self._uplink.put_nowait((self._up.arrival(self._clock()), text))

    async def begin(self) -> None:
        """Twilio's `connected` and `start` on the stream just opened, then the caller's side."""
        if self._up is not None:
            self._uplink_task = asyncio.create_task(self._carry_up())
        await self._send(Connected().to_json())
        start = Start(
            sequence_number=self._next_seq(),
            stream_sid=self.stream_sid,
            account_sid=self.account_sid,
            call_sid=self.call_sid,
            tracks=("inbound",),
            custom_parameters=self.parameters,
        )
        await self._send(start.to_json())
        self._stream_started = self._clock()
        if not self.log.streams:
            self.log.started = self._stream_started
        self.log.streams.append((self._stream_started, self.stream_sid))
        self._tasks = [
            asyncio.create_task(self._stream_caller()),
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._echo_marks()),
        ]
        if self._down is not None:
            self._tasks.append(asyncio.create_task(self._carry_down()))
        if self._uplink_task is not None:
            self._tasks.append(self._uplink_task)

    async def say(self, mulaw: bytes) -> float:
        """Queues caller audio; returns once its first frame is sent, with the time it was
        (raises `CallOver` once the call has ended)."""
        if self.closed.is_set():
            raise CallOver(f"the call is over ({self.log.ended}): nobody hears the caller")
        first: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        for i in range(0, len(mulaw), FRAME_BYTES):
            frame = mulaw[i : i + FRAME_BYTES].ljust(FRAME_BYTES, b"\xff")
            self._outgoing.append((frame, None if i else first))
        return await first

    async def interject(self, clip: bytes, label: str = "clip") -> float:
        """Mixes `clip` (8 kHz mu-law) into the caller's uplink from the next frame on, over
        whatever the caller is sending (speech, echo or silence), and logs it as `label`;
        returns its onset: when its first frame was sent."""
        return await self._inject(clip, label)

    def _inject(self, clip: bytes, label: str) -> asyncio.Future[float]:
        pcm = np.frombuffer(mulaw_decode(clip), np.int16).astype(np.float64)
        mixed = np.zeros(max(len(pcm), len(self._overlay)))
        mixed[: len(self._overlay)] += self._overlay
        mixed[: len(pcm)] += pcm
        self._overlay = mixed
        onset: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._onsets.append((onset, label))
        return onset

    async def backchannel(self) -> float:
        """The caller says "mm-hm" (383 ms) right now; returns its onset."""
        return await self.interject(sound("mm-hm"), "mm-hm")

    async def cough(self) -> float:
        """The caller coughs (150 ms) right now; returns its onset."""
        return await self.interject(sound("cough"), "cough")

    async def finish_speaking(self) -> None:
        while self._outgoing:
            await asyncio.sleep(FRAME_S)

    async def agent_audio_after(self, t: float, timeout: float) -> Heard | None:
        """The first agent audio that arrived after `t`, waiting up to `timeout` for it."""
        deadline = self._clock() + timeout
        while True:
            first = None
            for heard in reversed(self.log.heard):  # in the order received: newest last
                if heard.received <= t:
                    break
                first = heard
            if first is not None:
                return first
            if self._clock() >= deadline:
                return None
            await asyncio.sleep(0.02)

    async def agent_quiet(self, quiet_s: float, since: float = 0.0) -> None:
        """Returns once no agent audio has played for `quiet_s`, counted from `since` at the
        earliest, or once the call is over."""
        while not self.closed.is_set():
            # what was sent plays back to back; a clear cuts it at once; audio still on its
            # way over a slow network will play too
            if self._clock() - max(since, self._play_end, self._media_due) >= quiet_s:
                return
            await asyncio.sleep(0.05)

    async def _stream_caller(self) -> None:
        next_at = self._clock()
        while True:
            delay = next_at - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            # the frame's own time on the 20 ms grid, even when the loop runs late, so echo
            # and interjections land where they belong in the uplink
            at = next_at
            next_at += FRAME_S
            self._interject_when_due(at)
            sent: asyncio.Future[float] | None = None
            if self._outgoing:
                frame, sent = self._outgoing.popleft()
                if not self._outgoing:
                    self._said_at = at + FRAME_S
            elif self.continuous or len(self._overlay):
                frame = SILENCE
            else:
                continue
            onsets, self._onsets = self._onsets, []  # whatever was injected starts here
            try:
                await self.send_frame(self._mix(frame, at))
            finally:  # said even into a stream the server just closed (on goes the rest)
                now = self._clock()
                if sent is not None and not sent.done():
                    sent.set_result(now)
                for onset, label in onsets:
                    self.log.interjections.append((now, label))
                    onset.set_result(now)

    def _interject_when_due(self, at: float) -> None:
        if not self._interjections:
            return
        audible = self._reply_audible(at)
        for interjection in list(self._interjections):
            if audible > 0 and audible >= interjection.after_agent_s:  # 0 s: at the reply's onset
                self._interjections.remove(interjection)
                self._inject(sound(interjection.sound), interjection.sound)  # logs its onset

    def _reply_audible(self, at: float) -> float:
        """How long the caller has heard the agent, up to `at`, in the reply now playing."""
        total = 0.0
        later = at
        for heard in reversed(self.log.heard):
            if not heard.audio or heard.start >= at:
                continue  # cut by a clear before it played, or not playing yet
            if self._said_at is None or heard.start < self._said_at:
                break
            end = min(heard.end, at)
            if later - end >= REPLY_GAP_S:
                break
            total += end - heard.start
            later = heard.start
        return total

    def _mix(self, frame: bytes, at: float) -> bytes:
        """`frame` with the echo and any interjection added (in linear PCM), unchanged if
        there is nothing to add."""
        extra = np.zeros(FRAME_BYTES)
        if self._echo is not None:
            heard = self._heard_between(at - self._echo.delay_s, FRAME_BYTES)
            extra += heard * 10 ** (self._echo.level_db / 20)
        if len(self._overlay):
            take = self._overlay[:FRAME_BYTES]
            extra[: len(take)] += take
            self._overlay = self._overlay[FRAME_BYTES:]
        if not extra.any():
            return frame
        pcm = np.frombuffer(mulaw_decode(frame), np.int16) + np.rint(extra)
        return mulaw_encode(np.clip(pcm, -32768, 32767).astype("<i2").tobytes())

    def _heard_between(self, t0: float, n: int) -> np.ndarray:
        """The `n` samples the caller heard from time `t0` on."""
        out = np.zeros(n)
        for heard in reversed(self.log.heard):
            if not heard.audio:
                continue
            if heard.end <= t0:
                break  # what played before this ended earlier still
            offset = round((heard.start - t0) * 8000)
            first, last = max(0, offset), min(n, offset + len(heard.audio))
            if first < last:
                piece = mulaw_decode(heard.audio[first - offset : last - offset])
                out[first:last] = np.frombuffer(piece, np.int16)
        return out

    async def send_frame(self, payload: bytes) -> None:
        """One media message now, stamped as Twilio stamps it (ms since the stream started)."""
        self._chunk += 1
        media = Media(
            sequence_number=self._next_seq(),
            stream_sid=self.stream_sid,
            track="inbound",
            chunk=self._chunk,
            timestamp=int(round((self._clock() - self._stream_started) * 1000)),
            payload=payload,
        )
        self.log.sent.append((self._clock(), payload))
        await self._send(media.to_json())

    async def _receive(self) -> None:
        try:
            async for frame in self._ws:
                now = self._clock()
                event = parse_outbound(frame)
                if self._down is None:
                    await self._arrive(event, now)
                else:
                    at = self._down.arrival(now)
                    if isinstance(event, PlayMedia):
                        self._media_due = at
                    self._downlink.put_nowait((at, event))
            self._closed_by_server = True
        except ConnectionClosed as exc:  # closed with an error code: logged, but closed still
            self.log.protocol_errors.append(repr(exc))
            self._closed_by_server = True
        except Exception as exc:  # noqa: BLE001 - the log is what tests read
            self.log.protocol_errors.append(repr(exc))
        finally:
            if self._down is None:
                self._stream_over()
            else:
                self._downlink.put_nowait(None)  # the close arrives after what came before it

    async def _carry_down(self) -> None:
        """Hands Twilio each message from the server when it arrives over the `Network`."""
        try:
            while (item := await self._downlink.get()) is not None:
                at, event = item
                delay = at - self._clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self._arrive(event, at)
        finally:
            self._stream_over()

    def _stream_over(self) -> None:
        """Twilio has learnt that the stream is over: unless the caller hung up, the call goes
        on with what the TwiML says next, if anything (and the stream's unplayed audio is lost),
        or ends."""
        if self.closed.is_set():
            return
        if not self._closed_by_server:
            self._end("stream error")
        elif self._connect is None or not self._connect.goes_on:
            self._end("hangup")
        else:
            self._cut(self._clock())
            self._next = asyncio.create_task(self._after_stream(self._connect))

    async def _after_stream(self, done: _Connect) -> None:
        """What Twilio does once the server has closed `done`'s stream: requests its action
        URL and carries out the TwiML it answers, or carries out the verbs after it."""
        try:
            tasks, self._tasks = self._tasks, []
            for task in tasks:
                task.cancel()  # the caller's side of the old stream
            await asyncio.gather(*tasks, return_exceptions=True)
            if not done.action:
                await self._run(done.after, done.url, done.twilio)
                return
            at = self._clock()
            try:
                form, status, twiml = await done.twilio.action(done.action)
            except OSError as exc:  # the server is gone (it shut down): Twilio gets no TwiML
                form, status, twiml = {}, 0, str(exc)
            self.log.actions.append(ActionRequest(at, done.action, form, status, twiml))
            if status != 200:
                self._end("application error")  # Twilio: "an application error has occurred"
                return
            await self._run(_verbs(twiml), done.action, done.twilio)
        except Exception as exc:  # noqa: BLE001 - kept for place_call to raise
            self._failure = exc
            self._end("simulator error")

    async def _run(self, verbs: list[ET.Element], url: str, twilio: _Twilio) -> None:
        """Carries out TwiML verbs in order, as Twilio does, until one opens a stream or the
        call ends (`url` is the document's)."""
        for n, verb in enumerate(verbs):
            if verb.tag == "Connect":
                await self._open(_Connect.parse(verb, verbs[n + 1 :], url, twilio))
                return
            if verb.tag == "Hangup":
                break
            if verb.tag == "Dial":
                self.log.transfers.extend(_dialled(verb))
                self._end("dial")
                return
            if verb.tag == "Play":
                digits = _digits(verb)
                self.log.digits_played.append(digits.replace("w", "").replace("W", ""))
                await asyncio.sleep(sum(2 * KEY_S if key == "W" else KEY_S for key in digits))
            elif verb.tag == "Say":
                text = "".join(verb.itertext()).strip()
                self.log.said.append(text)
                await asyncio.sleep(SAY_S_PER_CHAR * len(text))
            else:
                raise WebhookError(200, f"the simulator cannot follow <{verb.tag}> (from {url})")
        self._end("hangup")

    async def _open(self, connect: _Connect) -> None:
        """A new Media Stream for the same call, as `connect` says: a new streamSid, its own
        parameters, counters from the start; the caller carries on (with what they still have
        to say, echo and interjections) over it."""
        self._ws = await connect.twilio.open_stream(connect.stream_url)
        self._connect = connect
        self.stream_url, self.parameters = connect.stream_url, connect.parameters
        self.stream_sid = _stream_sid(self.call_sid, len(self.log.streams))
        self._seq = self._chunk = 0
        self._pending_marks.clear()
        self._closed_by_server = False
        self._uplink, self._downlink = asyncio.Queue(), asyncio.Queue()
        self._uplink_task = None
        await self.begin()

    def _end(self, how: Ending) -> None:
        """The call is over (the first reason is the one logged). What the caller still had
        to say is heard by nobody: a test waiting for it fails instead of waiting forever."""
        if not self.closed.is_set():
            self.log.ended = how
            self.closed.set()
        for _, first in self._outgoing:
            if first is not None and not first.done():
                first.set_exception(CallOver(f"the call is over ({how}): nobody hears the caller"))
        self._outgoing.clear()

    async def _carry_up(self) -> None:
        """Delivers Twilio's messages to the server when they arrive over the `Network`; None
        ends it (everything sent before has arrived: the socket can close)."""
        while (item := await self._uplink.get()) is not None:
            at, text = item
            delay = at - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._ws.send(text)

    async def _arrive(self, event: OutboundEvent, at: float) -> None:
        """What Twilio does with a message from the server that reached it at `at`."""
        if isinstance(event, PlayMedia):
            start = max(at, self._play_end)
            self._play_end = start + len(event.payload) / 8000
            self.log.media.append((at, len(event.payload)))
            self.log.heard.append(Heard(start, event.payload, at))
        elif isinstance(event, PlayMark):
            self.log.marks_received += 1
            self._pending_marks.append((max(at, self._play_end), event.name))
            self._mark_waiting.set()
        elif isinstance(event, Clear):
            self._clear(at)
            await self._flush_marks(all_of_them=True)

    def _clear(self, now: float) -> None:
        self.log.clears.append(now)
        self._cut(now)

    def _cut(self, now: float) -> None:
        """The caller hears nothing more of what was sent before `now`."""
        for h in self.log.heard:
            if h.start + len(h.audio) / 8000 > now:
                h.audio = h.audio[: max(0, int((now - h.start) * 8000))]
        self._play_end = now

    async def _flush_marks(self, all_of_them: bool = False) -> None:
        now = self._clock()
        while self._pending_marks and (all_of_them or self._pending_marks[0][0] <= now):
            _, name = self._pending_marks.popleft()
            self.log.marks_echoed += 1
            mark = Mark(sequence_number=self._next_seq(), stream_sid=self.stream_sid, name=name)
            await self._send(mark.to_json())

    async def _echo_marks(self) -> None:
        """Each mark goes back once the audio before it has played (a clear sends them all)."""
        while True:
            self._mark_waiting.clear()
            # marks are due in the order they came (a clear sends them all): the first is next;
            # a new mark wakes us to look again
            due = self._pending_marks[0][0] - self._clock() if self._pending_marks else None
            if due is None or due > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(due):
                        await self._mark_waiting.wait()
            await self._flush_marks()

    async def press(self, digit: str) -> None:
        self.log.keys.append((self._clock(), digit))
        dtmf = Dtmf(self._next_seq(), self.stream_sid, "inbound_track", digit)
        await self._send(dtmf.to_json())

    async def press_keys(self, digits: str, gap_s: float = 0.1) -> None:
        """Keys in quick succession, `gap_s` from one to the next (as a caller types a number
        in): one `dtmf` message each, while the caller's media keeps flowing."""
        if bad := set(digits) - set(DIGITS):
            raise ValueError(f"not phone keys: {''.join(sorted(bad))!r}")
        first = self._clock()
        for n, digit in enumerate(digits):
            await asyncio.sleep(max(0.0, first + n * gap_s - self._clock()))
            await self.press(digit)

    async def hang_up(self) -> None:
        """The caller hangs up: Twilio's `stop`, then the socket closes (over a `Network`, once
        everything sent before it has arrived). Nothing more of the TwiML is carried out."""
        self._end("caller")
        if self._tasks:
            self._tasks[0].cancel()  # no caller audio after the stop
        with contextlib.suppress(Exception):
            stop = Stop(self._next_seq(), self.stream_sid, self.account_sid, self.call_sid)
            await self._send(stop.to_json())
        if self._uplink_task is not None:
            self._uplink.put_nowait(None)
            await asyncio.wait([self._uplink_task])
        await self.close()

    async def close(self) -> None:
        """Ends the call from the caller's side at once (no `stop`)."""
        self._end("caller")
        if self._next is not None:
            self._next.cancel()
            await asyncio.gather(self._next, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._ws.close()


@contextlib.asynccontextmanager
async def place_call(
    base_url: str = "",
    *,
    app: Any = None,
    auth_token: str = "",
    public_url: str = "",
    call_sid: str = "CA" + "1" * 32,
    caller: str = "+15550001111",
    callee: str = "+15550002222",
    continuous: bool = True,
    network: Network | None = None,
    echo: Echo | None = None,
    interjections: Sequence[Interjection] = (),
    webhook_fields: Mapping[str, str] | None = None,
) -> AsyncIterator[CallerSimulator]:
    """Does what Twilio does when a call comes in, up to an open Media Stream (and after it
    what the TwiML says, see the module's docstring): over the network to `base_url`, or
    in-process to a Quart `app` (already started, e.g. inside `app.test_app()`). Action URLs
    are requested on the same server, at their path. TwiML after the stream that the
    simulator cannot follow raises its `WebhookError` on the way out.

    `public_url` is the URL Twilio would have used (what the server validates signatures
    against); it defaults to `base_url` (`http://localhost` in-process). `network`, `echo`
    and `interjections` make the line and the caller more like real ones (see the module's
    docstring); the `network` slows the Media Streams, not the webhook or action requests.
    `webhook_fields` adds to (or replaces) the webhook's form fields, e.g. a SIP Domain's
    `SipDomain`."""
    if bool(base_url) == (app is not None):
        raise ValueError("place_call needs a base_url or an app, not both")
    public = (public_url or base_url or "http://localhost").rstrip("/")
    form = {
        "CallSid": call_sid,
        "From": caller,
        "To": callee,
        "AccountSid": "AC" + "0" * 32,
        "Direction": "inbound",
        **(webhook_fields or {}),
    }
    signer = SignatureChecker(auth_token, public) if auth_token else None
    async with contextlib.AsyncExitStack() as stack:
        twilio = _Twilio(base_url, app, signer, stack, form)
        status, body = await twilio.post(public + "/voice", "/voice", form)
        if status != 200:
            raise WebhookError(status, body)
        caller_options = _CallerOptions(continuous, network, echo, tuple(interjections))
        async with _follow(body, public + "/voice", twilio, form, caller_options) as sim:
            yield sim


@contextlib.asynccontextmanager
async def answer_call(
    base_url: str = "",
    *,
    app: Any = None,
    form: Mapping[str, str],
    url: str = "",
    twiml: str = "",
    auth_token: str = "",
    continuous: bool = True,
    network: Network | None = None,
    echo: Echo | None = None,
    interjections: Sequence[Interjection] = (),
) -> AsyncIterator[CallerSimulator]:
    """Does what Twilio does once a call it placed (REST API, `Direction=outbound-api`) is
    answered: requests the call's `url` with `form` (the call's standard parameters, which
    action requests repeat) or takes its inline `twiml`, and follows the TwiML as `place_call`
    does. The simulator is then the far end: the person or machine that answered.

    `url` is the absolute URL Twilio was given (what it signs); its path and query are
    requested on `base_url`, or in-process on `app`, and so are action and stream URLs. A
    webhook answering other than 200 raises `WebhookError` at once."""
    if bool(base_url) == (app is not None):
        raise ValueError("answer_call needs a base_url or an app, not both")
    if bool(url) == bool(twiml):
        raise ValueError("answer_call needs the call's url or its twiml, not both")
    signer = SignatureChecker(auth_token, base_url or "http://localhost") if auth_token else None
    async with contextlib.AsyncExitStack() as stack:
        twilio = _Twilio(base_url, app, signer, stack, form)
        if url:
            target = urllib.parse.urlsplit(url)
            path = (target.path or "/") + (f"?{target.query}" if target.query else "")
            status, twiml = await twilio.post(url, path, dict(form))
            if status != 200:
                raise WebhookError(status, twiml)
        caller_options = _CallerOptions(continuous, network, echo, tuple(interjections))
        async with _follow(twiml, url, twilio, form, caller_options) as sim:
            yield sim


@dataclass(frozen=True)
class _CallerOptions:
    continuous: bool
    network: Network | None
    echo: Echo | None
    interjections: tuple[Interjection, ...]


@contextlib.asynccontextmanager
async def _follow(
    twiml: str, url: str, twilio: _Twilio, form: Mapping[str, str], options: _CallerOptions
) -> AsyncIterator[CallerSimulator]:
    """From the TwiML a call was answered with (at `url`) to its first Media Stream, and the
    call's simulator on it until the caller leaves; TwiML it could not follow is raised then."""
    first = _first_connect(twiml, url, twilio)
    sim = CallerSimulator(
        await twilio.open_stream(first.stream_url),
        call_sid=form["CallSid"],
        parameters=first.parameters,
        continuous=options.continuous,
        network=options.network,
        echo=options.echo,
        interjections=options.interjections,
        connect=first,
        account_sid=form["AccountSid"],
    )
    await sim.begin()
    try:
        yield sim
    finally:
        await sim.close()
        if sim._failure is not None:
            raise sim._failure
