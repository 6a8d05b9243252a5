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
from collections.abc import AsyncGenerator, AsyncIterator

import numpy as np
from google.adk.agents import LlmAgent
from google.adk.apps import App
from google.adk.models import BaseLlm, LlmRequest, LlmResponse
from google.adk.models.base_llm_connection import BaseLlmConnection
from google.adk.models.registry import LLMRegistry
from google.genai import types

from ..audio import PcmResampler
from ..vad import SpeechEnd, SpeechStart, VoiceActivityDetector

__all__ = ["EchoConnection", "EchoLlm", "chime", "echo_app"]

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


class EchoConnection(BaseLlmConnection):
    """One live session of the echo model: reads what the caller says, repeats it."""

    def __init__(self, *, speed: float, greet: bool, vad_disabled: bool) -> None:
        self._speed = speed
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

    async def send_history(self, history: list[types.Content]) -> None:
        """History carries no audio; the echo has nothing to say about it."""

    async def send_content(self, content: types.Content) -> None:
        if content.parts and any(p.function_response for p in content.parts):
            self._responses.put_nowait(LlmResponse(turn_complete=True))

    async def send_realtime(self, blob: types.Blob) -> None:
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
        self._generation = asyncio.create_task(self._speak(reply, f"(echo of {seconds:.1f} s)"))

    async def _speak(self, pcm24: bytes, text: str) -> None:
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

    async def receive(self) -> AsyncGenerator[LlmResponse, None]:
        # ADK calls receive() again whenever it returns after yielding; returning without
        # yielding (only once closed) is what ends the session.
        while not self._closed:
            response = await self._responses.get()
            if response is None:
                return
            yield response

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._generation is not None:
            self._generation.cancel()
        self._responses.put_nowait(None)


class EchoLlm(BaseLlm):
    """`echo-live` (any `echo-*` name): the simulated live model. `speed` is generation speed
    relative to real time."""

    model: str = "echo-live"
    speed: float = 4.0
    greet: bool = True

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
        connection = EchoConnection(
            speed=self.speed,
            greet=self.greet,
            vad_disabled=bool(detection and detection.disabled),
        )
        try:
            yield connection
        finally:
            await connection.close()


LLMRegistry.register(EchoLlm)


def echo_app(speed: float = 4.0, greet: bool = True) -> App:
    agent = LlmAgent(
        name="echo",
        model=EchoLlm(speed=speed, greet=greet),
        instruction="Repeat what the caller says.",
    )
    return App(name="echo", root_agent=agent)
