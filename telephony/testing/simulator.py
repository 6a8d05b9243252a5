"""The Twilio side of a call, for tests and local runs: a caller simulator that speaks the real
protocol. It posts the signed voice webhook, follows the TwiML to the Media Stream, streams
caller audio in real time (20 ms frames), plays agent audio at 8,000 bytes/s as Twilio would,
echoes marks once their audio has played and honours `clear`.

It reaches the server over the network (`place_call(url)`) or in-process through the ASGI app
(`place_call(app=app)`), which is what lets a replay run on a virtual clock."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from ..audio import mulaw_decode
from ..twilio.media_stream import (
    Clear,
    Connected,
    Dtmf,
    Mark,
    Media,
    PlayMark,
    PlayMedia,
    Start,
    Stop,
    parse_outbound,
)
from ..twilio.signatures import SignatureChecker

__all__ = ["CallLog", "CallerSimulator", "Heard", "StreamSocket", "WebhookError", "place_call"]

FRAME_BYTES = 160
FRAME_S = 0.02
SILENCE = b"\xff" * FRAME_BYTES


class WebhookError(RuntimeError):
    """The voice webhook did not answer with a usable <Connect><Stream>."""

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


@dataclass
class CallLog:
    """What the Twilio side saw, with monotonic timestamps."""

    started: float = 0.0
    sent: list[tuple[float, bytes]] = field(default_factory=list)
    """Caller audio frames as sent."""
    media: list[tuple[float, int]] = field(default_factory=list)
    clears: list[float] = field(default_factory=list)
    marks_received: int = 0
    marks_echoed: int = 0
    heard: list[Heard] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)

    def heard_pcm(self, until: float | None = None) -> np.ndarray:
        """The caller's earpiece as one 8 kHz int16 timeline from the stream's start."""
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


def _stream_from_twiml(twiml: str) -> tuple[str, dict[str, str]]:
    root = ET.fromstring(twiml)
    stream = root.find("./Connect/Stream")
    if stream is None or not stream.get("url"):
        raise WebhookError(200, f"no <Connect><Stream url=...> in {twiml}")
    params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    return stream.get("url", ""), params


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


class CallerSimulator:
    """One simulated call on an open Media Stream. Use `place_call()` to get one."""

    def __init__(
        self,
        ws: StreamSocket | ClientConnection,
        *,
        call_sid: str,
        parameters: dict[str, str],
        continuous: bool = True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._ws = ws
        self.call_sid = call_sid
        self.stream_sid = "MZ" + call_sid[2:]
        self._parameters = parameters
        self.continuous = continuous
        """Like real Twilio, send silence frames whenever the caller has nothing to say."""
        self._clock = clock or asyncio.get_running_loop().time
        self.log = CallLog()
        self.stream_url = ""
        """Where the TwiML told Twilio to open the stream (set by `place_call`)."""
        self._outgoing: deque[tuple[bytes, asyncio.Future[float] | None]] = deque()
        self._seq = 0
        self._chunk = 0
        self._play_end = 0.0
        self._pending_marks: deque[tuple[float, str]] = deque()
        self._mark_waiting = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.closed = asyncio.Event()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def _send(self, text: str) -> None:
        await self._ws.send(text)

    async def begin(self) -> None:
        await self._send(Connected().to_json())
        start = Start(
            sequence_number=self._next_seq(),
            stream_sid=self.stream_sid,
            account_sid="AC" + "0" * 32,
            call_sid=self.call_sid,
            tracks=("inbound",),
            custom_parameters=self._parameters,
        )
        await self._send(start.to_json())
        self.log.started = self._clock()
        self._tasks = [
            asyncio.create_task(self._stream_caller()),
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._echo_marks()),
        ]

    async def say(self, mulaw: bytes) -> float:
        """Queues caller audio; returns once its first frame is sent, with the time it was."""
        first: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        for i in range(0, len(mulaw), FRAME_BYTES):
            frame = mulaw[i : i + FRAME_BYTES].ljust(FRAME_BYTES, b"\xff")
            self._outgoing.append((frame, None if i else first))
        return await first

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
            # what was sent plays back to back; a clear cuts it at once
            if self._clock() - max(since, self._play_end) >= quiet_s:
                return
            await asyncio.sleep(0.05)

    async def _stream_caller(self) -> None:
        next_at = self._clock()
        while True:
            delay = next_at - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at += FRAME_S
            sent: asyncio.Future[float] | None = None
            if self._outgoing:
                frame, sent = self._outgoing.popleft()
            elif self.continuous:
                frame = SILENCE
            else:
                continue
            await self.send_frame(frame)
            if sent is not None and not sent.done():
                sent.set_result(self._clock())

    async def send_frame(self, payload: bytes) -> None:
        """One media message now, stamped as Twilio stamps it (ms since the stream started)."""
        self._chunk += 1
        media = Media(
            sequence_number=self._next_seq(),
            stream_sid=self.stream_sid,
            track="inbound",
            chunk=self._chunk,
            timestamp=int(round((self._clock() - self.log.started) * 1000)),
            payload=payload,
        )
        self.log.sent.append((self._clock(), payload))
        await self._send(media.to_json())

    async def _receive(self) -> None:
        try:
            async for frame in self._ws:
                now = self._clock()
                event = parse_outbound(frame)
                if isinstance(event, PlayMedia):
                    start = max(now, self._play_end)
                    self._play_end = start + len(event.payload) / 8000
                    self.log.media.append((now, len(event.payload)))
                    self.log.heard.append(Heard(start, event.payload, now))
                elif isinstance(event, PlayMark):
                    self.log.marks_received += 1
                    self._pending_marks.append((max(now, self._play_end), event.name))
                    self._mark_waiting.set()
                elif isinstance(event, Clear):
                    self._clear(now)
                    await self._flush_marks(all_of_them=True)
        except Exception as exc:  # noqa: BLE001 - the log is what tests read
            self.log.protocol_errors.append(repr(exc))
        finally:
            self.closed.set()

    def _clear(self, now: float) -> None:
        self.log.clears.append(now)
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
        dtmf = Dtmf(self._next_seq(), self.stream_sid, "inbound_track", digit)
        await self._send(dtmf.to_json())

    async def hang_up(self) -> None:
        """Twilio's `stop`, then the socket closes."""
        if self._tasks:
            self._tasks[0].cancel()  # no caller audio after the stop
        with contextlib.suppress(Exception):
            stop = Stop(self._next_seq(), self.stream_sid, "AC" + "0" * 32, self.call_sid)
            await self._send(stop.to_json())
        await self.close()

    async def close(self) -> None:
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
) -> AsyncIterator[CallerSimulator]:
    """Does what Twilio does when a call comes in, up to an open Media Stream: over the
    network to `base_url`, or in-process to a Quart `app` (already started, e.g. inside
    `app.test_app()`).

    `public_url` is the URL Twilio would have used (what the server validates signatures
    against); it defaults to `base_url` (`http://localhost` in-process)."""
    if bool(base_url) == (app is not None):
        raise ValueError("place_call needs a base_url or an app, not both")
    public = (public_url or base_url or "http://localhost").rstrip("/")
    form = {"CallSid": call_sid, "From": caller, "To": callee, "AccountSid": "AC" + "0" * 32}
    headers = {}
    signer = SignatureChecker(auth_token, public) if auth_token else None
    if signer:
        headers["X-Twilio-Signature"] = signer.sign(public + "/voice", form)
    if app is not None:
        client = app.test_client()
        response = await client.post("/voice", form=form, headers=headers)
        status, body = response.status_code, await response.get_data(as_text=True)
    else:
        status, body = await _post_form(base_url.rstrip("/") + "/voice", form, headers)
    if status != 200:
        raise WebhookError(status, body)
    stream_url, params = _stream_from_twiml(body)
    ws_headers = {}
    if signer:
        ws_headers["X-Twilio-Signature"] = signer.sign(stream_url, {})
    target = urllib.parse.urlsplit(stream_url)
    async with contextlib.AsyncExitStack() as stack:
        ws: StreamSocket | ClientConnection
        if app is not None:
            connection = client.websocket(target.path, headers=ws_headers)
            ws = _AppSocket(await stack.enter_async_context(connection))
        else:
            local = urllib.parse.urlsplit(base_url)
            scheme = "wss" if local.scheme == "https" else "ws"
            connect_url = urllib.parse.urlunsplit((scheme, local.netloc, target.path, "", ""))
            ws = await stack.enter_async_context(
                connect(
                    connect_url,
                    additional_headers=ws_headers,
                    max_size=2**20,
                    compression=None,  # Twilio does not negotiate permessage-deflate
                )
            )
        sim = CallerSimulator(ws, call_sid=call_sid, parameters=params, continuous=continuous)
        sim.stream_url = stream_url
        await sim.begin()
        try:
            yield sim
        finally:
            await sim.close()
