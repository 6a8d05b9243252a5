"""An offline live model that behaves like Gemini Live, for running and testing without keys.

`EchoLlm` is a real ADK `BaseLlm`, registered under the `echo-` prefix and driven by the real
`Runner.run_live`. It listens with voice activity detection; after about 600 ms of silence it
speaks the caller's own utterance back (16 kHz -> 24 kHz), generated faster than real time, with
input and output transcriptions and `turn_complete`. It reports `interrupted` only when the
caller speaks while it is still generating, as Gemini does, and greets with a short chime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np
from google.adk.agents import LlmAgent
from google.adk.apps import App
from google.adk.models import BaseLlm, LlmRequest, LlmResponse
from google.adk.models.base_llm_connection import BaseLlmConnection
from google.adk.models.registry import LLMRegistry
from google.genai import types
from pydantic import PrivateAttr
from websockets.exceptions import ConnectionClosedError
from websockets.frames import Close

from ..audio import PcmResampler
from ..audio.vad import SpeechEnd, SpeechStart, VoiceActivityDetector

__all__ = ["EchoConnection", "EchoFaults", "EchoLlm", "chime", "echo_app"]

log = logging.getLogger(__name__)

OUT_RATE = 24000
OUT_MIME = f"audio/pcm;rate={OUT_RATE}"
IN_BYTES_PER_MS = 32
CHUNK_MS = 40
PRE_ROLL_MS = 200
"""Audio kept from before the detected onset, so the echo starts with the first syllable."""


def chime(duration_s: float = 0.45) -> bytes:
    """A two-note chime (24 kHz PCM16) with soft edges, so it does not click."""
    t = np.arange(int(OUT_RATE * duration_s)) / OUT_RATE
    half = len(t) // 2
    freq = np.where(np.arange(len(t)) < half, 660.0, 880.0)
    envelope = np.minimum(1, np.minimum(t, t[-1] - t) / 0.02) * np.exp(-2.5 * t)
    wave = 9000 * envelope * np.sin(2 * np.pi * freq * t)
    return wave.astype("<i2").tobytes()


@dataclass(frozen=True)
class EchoFaults:
    """Failures the simulated model produces on demand, the way Gemini Live fails, so tests
    can show that calls survive them. Times count from each connection's opening."""

    fail_connects: int = 0
    """The first N connection attempts fail (ADK cannot reconnect; run_live raises)."""
    drop_after_s: float | None = None
    """Each connection drops (close code 1011) this long after it opened."""
    go_away_after_s: float | None = None
    """Each connection sends `go_away` this long after it opened (ADK then reconnects)."""
    stall_after_s: float | None = None
    """Each connection stops answering (and listening) this long after it opened."""
    reply_delay_s: float = 0.0
    """Extra thinking time before each reply."""
    resumable: bool = True
    """Send session resumption handles (without them, ADK cannot reconnect after a drop)."""
    faulty_connections: int | None = None
    """Drops, go_aways, stalls and delays hit only the first N connections (None: all)."""


_DROP = LlmResponse()
"""Queued in place of a response: receive() raises a dropped connection."""


class EchoConnection(BaseLlmConnection):
    """One live session of the echo model: reads what the caller says, repeats it."""

    def __init__(
        self,
        *,
        speed: float,
        greet: bool,
        vad_disabled: bool,
        faults: EchoFaults = EchoFaults(),
        resumed: bool = False,
    ) -> None:
        self._speed = speed
        self.faults = faults
        self.resumed = resumed
        """Opened with a session resumption handle."""
        self.history: list[types.Content] = []
        """What ADK sent as history (a run_live restarted on an existing session)."""
        self._stalled = False
        self._vad_disabled = vad_disabled
        self._responses: asyncio.Queue[LlmResponse | None] = asyncio.Queue()
        self._vad = VoiceActivityDetector(end_ms=600)
        self._heard = bytearray()
        self._heard_base = 0
        """Stream offset (bytes) of `_heard[0]`: older audio is dropped after each utterance."""
        self._utterance_start: int | None = None
        self._generation: asyncio.Task[None] | None = None
        self._closed = False
        if greet:
            self._generation = asyncio.create_task(self._speak(chime(), "(chime)"))
        if faults.resumable:
            self._resumption_update()
        self._fault_tasks = [
            asyncio.create_task(self._after(delay, action))
            for delay, action in (
                (faults.drop_after_s, lambda: self._responses.put_nowait(_DROP)),
                (
                    faults.go_away_after_s,
                    lambda: self._responses.put_nowait(
                        LlmResponse(go_away=types.LiveServerGoAway(time_left="1s"))
                    ),
                ),
                (faults.stall_after_s, self._stall),
            )
            if delay is not None
        ]

    async def _after(self, delay: float, action: Callable[[], None]) -> None:
        await asyncio.sleep(delay)
        action()

    def _stall(self) -> None:
        self._stalled = True
        if self._generation is not None:
            self._generation.cancel()

    def _resumption_update(self) -> None:
        self._responses.put_nowait(
            LlmResponse(
                live_session_resumption_update=types.LiveServerSessionResumptionUpdate(
                    new_handle=f"echo-{id(self):x}-{self._heard_base}", resumable=True
                )
            )
        )

    async def send_history(self, history: list[types.Content]) -> None:
        """History carries no audio; the echo only keeps it for tests to look at."""
        self.history = list(history)

    async def send_content(self, content: types.Content) -> None:
        if content.parts and any(p.function_response for p in content.parts):
            self._responses.put_nowait(LlmResponse(turn_complete=True))

    async def send_realtime(self, blob: types.Blob) -> None:
        if self._stalled:  # a stalled connection stops reading: ADK's sender blocks here
            await asyncio.Event().wait()
        if isinstance(blob, types.ActivityStart):
            self._on_speech_start(self._heard_base + len(self._heard))
        elif isinstance(blob, types.ActivityEnd):
            self._on_speech_end(self._heard_base + len(self._heard))
        elif isinstance(blob, types.LiveClientRealtimeInput):
            if blob.audio_stream_end:
                end = self._vad.end_of_stream()
                if end is not None and not self._vad_disabled:
                    self._on_speech_end(self._heard_base + len(self._heard))
        elif isinstance(blob, types.Blob) and blob.data and blob.mime_type:
            if not blob.mime_type.startswith("audio/pcm"):
                return
            self._heard += blob.data
            if self._vad_disabled:
                return
            for event in self._vad.feed(blob.data):
                offset = event.offset_ms * IN_BYTES_PER_MS
                if isinstance(event, SpeechStart):
                    self._on_speech_start(offset)
                elif isinstance(event, SpeechEnd):
                    self._on_speech_end(offset)
            if self._utterance_start is None:
                self._forget_old_audio(keep_ms=1000)

    def _forget_old_audio(self, keep_ms: int) -> None:
        drop = max(0, len(self._heard) - keep_ms * IN_BYTES_PER_MS)
        del self._heard[:drop]
        self._heard_base += drop

    def _on_speech_start(self, offset: int) -> None:
        self._utterance_start = max(self._heard_base, offset - PRE_ROLL_MS * IN_BYTES_PER_MS)
        if self._generation is not None and not self._generation.done():
            self._generation.cancel()
            self._generation = None
            # Gemini sends the transcription of what it did say before `interrupted`.
            self._responses.put_nowait(
                LlmResponse(output_transcription=types.Transcription(finished=True))
            )
            self._responses.put_nowait(LlmResponse(interrupted=True))

    def _on_speech_end(self, offset: int) -> None:
        if self._utterance_start is None:
            return
        base = self._heard_base
        utterance = bytes(self._heard[self._utterance_start - base : offset - base])
        self._utterance_start = None
        self._forget_old_audio(keep_ms=PRE_ROLL_MS)
        seconds = len(utterance) / (IN_BYTES_PER_MS * 1000)
        self._responses.put_nowait(
            LlmResponse(
                input_transcription=types.Transcription(
                    text=f"(caller spoke for {seconds:.1f} s)", finished=True
                )
            )
        )
        reply = PcmResampler(3, 2).convert(utterance)
        self._generation = asyncio.create_task(
            self._speak(reply, f"(echo of {seconds:.1f} s)", delay=self.faults.reply_delay_s)
        )

    async def _speak(self, pcm24: bytes, text: str, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        step = CHUNK_MS * OUT_RATE // 1000 * 2
        self._responses.put_nowait(
            LlmResponse(output_transcription=types.Transcription(text=text, finished=False))
        )
        for i in range(0, len(pcm24), step):
            part = types.Part(inline_data=types.Blob(data=pcm24[i : i + step], mime_type=OUT_MIME))
            self._responses.put_nowait(
                LlmResponse(content=types.Content(role="model", parts=[part]), partial=True)
            )
            await asyncio.sleep(CHUNK_MS / 1000 / self._speed)
        self._responses.put_nowait(
            LlmResponse(output_transcription=types.Transcription(text=text, finished=True))
        )
        self._responses.put_nowait(LlmResponse(turn_complete=True))
        if self.faults.resumable:
            self._resumption_update()

    async def receive(self) -> AsyncGenerator[LlmResponse, None]:
        # ADK calls receive() again whenever it returns after yielding; returning without
        # yielding (only once closed) is what ends the session.
        while not self._closed:
            response = await self._responses.get()
            if response is None:
                return
            if response is _DROP:
                raise ConnectionClosedError(Close(1011, "simulated drop"), None)
            if self._stalled:
                continue
            yield response

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._generation is not None:
            self._generation.cancel()
        for task in self._fault_tasks:
            task.cancel()
        self._responses.put_nowait(None)


class EchoLlm(BaseLlm):
    """`echo-live` (any `echo-*` name): the simulated live model. `speed` is generation speed
    relative to real time."""

    model: str = "echo-live"
    speed: float = 4.0
    greet: bool = True
    faults: EchoFaults = EchoFaults()
    keep_connections: bool = False
    """Keep every connection for tests to inspect (they hold audio: never in a server)."""
    _connections: list[EchoConnection] = PrivateAttr(default_factory=list)
    _opened: int = PrivateAttr(default=0)
    _attempts: int = PrivateAttr(default=0)

    @property
    def connections(self) -> list[EchoConnection]:
        """Every connection this model opened, oldest first, with `keep_connections`."""
        return self._connections

    @classmethod
    def supported_models(cls) -> list[str]:
        return [r"echo-.*"]

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncGenerator[LlmResponse, None]:
        raise NotImplementedError("the echo model only runs live (Runner.run_live)")
        yield  # pragma: no cover

    @contextlib.asynccontextmanager
    async def connect(self, llm_request: LlmRequest) -> AsyncIterator[BaseLlmConnection]:
        config = llm_request.live_connect_config
        detection = (
            config.realtime_input_config.automatic_activity_detection
            if (config and config.realtime_input_config)
            else None
        )
        self._attempts += 1
        if self._attempts <= self.faults.fail_connects:
            raise ConnectionClosedError(Close(1011, "simulated connect failure"), None)
        handle = config.session_resumption.handle if config and config.session_resumption else None
        limit = self.faults.faulty_connections
        healthy = limit is not None and self._opened >= limit
        connection = EchoConnection(
            speed=self.speed,
            greet=self.greet and not handle and not llm_request.contents,
            vad_disabled=bool(detection and detection.disabled),
            faults=EchoFaults(resumable=self.faults.resumable) if healthy else self.faults,
            resumed=bool(handle),
        )
        self._opened += 1
        if self.keep_connections:
            self._connections.append(connection)
        try:
            yield connection
        finally:
            await connection.close()


LLMRegistry.register(EchoLlm)


def echo_app(
    speed: float = 4.0,
    greet: bool = True,
    faults: EchoFaults = EchoFaults(),
    keep_connections: bool = False,
) -> App:
    agent = LlmAgent(
        name="echo",
        model=EchoLlm(speed=speed, greet=greet, faults=faults, keep_connections=keep_connections),
        instruction="Repeat what the caller says.",
    )
    return App(name="echo", root_agent=agent)
