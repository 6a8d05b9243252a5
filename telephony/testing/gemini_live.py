"""A stand-in for the Gemini Live API on loopback, faithful to the wire.

The production path (ADK `Gemini` -> `GeminiLlmConnection` -> google-genai `aio.live.connect`)
connects to it unchanged over TLS, so tests exercise the real client code, its reconnects and
its quirks instead of a simulation of them. It behaves like the service, not like our bridge
would like it: its own voice activity detection decides turns, replies are generated faster
than real time, `interrupted` comes only while it is still generating, and everything it
generated stays in its context whether or not the caller heard it.

There is no speech recognition or language model: transcripts are deterministic placeholders
and a reply to speech echoes the caller's utterance (16 kHz resampled to 24 kHz), so audio
fidelity can be checked end to end. Text turns get a synthetic voiced reply.

Point google-genai at it with `service.environ()` (set before the client is built; ADK builds
one client per event loop on first use) or with
`HttpOptions(base_url=service.base_url, async_client_args={"ssl": service.ssl_context()})`.
Vertex AI paths and formats are not served.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import enum
import itertools
import json
import math
import re
import ssl
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .standin import LoopbackService, in_thread

__all__ = [
    "MODEL_RULES",
    "ConnectionRecord",
    "ContextTurn",
    "FaultKind",
    "FaultPlan",
    "GeminiLiveService",
    "ModelRules",
    "ServiceBehaviour",
    "SpeechDetector",
    "SpeechEvent",
    "resample",
    "running_in_thread",
    "voiced_audio",
]

INPUT_RATE = 16000
OUTPUT_RATE = 24000
OUTPUT_MIME = f"audio/pcm;rate={OUTPUT_RATE}"
AUDIO_TOKENS_PER_S = 32
"""Gemini's documented audio token rate; usage figures are estimates built on it."""

_PATH = re.compile(
    r"/ws/google\.ai\.generativelanguage\.(v1alpha|v1beta)\.GenerativeService\.BidiGenerateContent"
)
_NO_KEY_REASON = "Method doesn't allow unregistered callers (callers without established identity)."
_INTERNAL_REASON = "Internal error encountered."


# --- audio ------------------------------------------------------------------------------------


def resample(pcm: bytes, src_rate: int, dst_rate: int) -> bytes:
    """PCM16 LE at `src_rate` -> `dst_rate`, anti-aliased (polyphase Kaiser-windowed sinc).

    Self-contained so the stand-in shares no audio code with the product it checks.
    """
    if src_rate == dst_rate:
        return pcm
    x = np.frombuffer(pcm[: len(pcm) // 2 * 2], "<i2").astype(np.float64)
    g = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    per_phase = 24
    taps = per_phase * up + 1
    cutoff = 0.45 / max(up, down)
    n = np.arange(taps) - (taps - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(taps, 8.0) * up
    padded = np.concatenate([x, np.zeros(per_phase + 1)])
    pos = np.arange(len(x) * up // down) * down + (taps - 1) // 2
    phase, base = pos % up, pos // up
    y = np.empty(len(pos))
    for p in range(up):
        conv = np.convolve(padded, h[p::up])
        chosen = phase == p
        y[chosen] = conv[base[chosen]]
    return np.clip(np.round(y), -32768, 32767).astype("<i2").tobytes()


_FORMANTS = ((700.0, 110.0), (1220.0, 120.0), (2600.0, 160.0))
"""(frequency, bandwidth) in Hz of the vowel /a/."""


def voiced_audio(seconds: float, rate: int = OUTPUT_RATE, level_dbfs: float = -20.0) -> bytes:
    """A deterministic vowel-like voice: 140 Hz harmonics under /a/ formants, falling
    intonation and a four-per-second syllable envelope.

    Voice-like on purpose: webrtcvad (the product's VAD) and this service's VAD must both
    hear it as speech, where a pure tone or noise would test nothing real.
    """
    count = int(seconds * rate)
    t = np.arange(count) / rate
    f0 = 140.0 * (1.0 + 0.06 * np.cos(2 * np.pi * 0.7 * t)) * (1.0 - 0.1 * t / max(seconds, 1e-9))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    signal = np.zeros(count)
    for k in range(1, int(3800 / 140) + 1):
        gain = sum(1.0 / (1.0 + ((k * 140.0 - f) / bw) ** 2) for f, bw in _FORMANTS)
        signal += gain / k**0.5 * np.sin(k * phase)
    envelope = 0.25 + 0.75 * np.sin(np.pi * ((t * 4.0) % 1.0)) ** 2
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.01)
    signal *= envelope * np.clip(fade, 0.0, 1.0)
    rms = math.sqrt(float(np.mean(signal**2))) if count else 1.0
    signal *= 32768 * 10 ** (level_dbfs / 20) / max(rms, 1e-9)
    return np.clip(np.round(signal), -32768, 32767).astype("<i2").tobytes()


@dataclass(frozen=True)
class SpeechEvent:
    kind: Literal["start", "end"]
    pcm: bytes = b""
    """For "end": the utterance from speech onset to its last speech frame (16 kHz PCM16)."""


class SpeechDetector:
    """The service's own voice activity detection, deliberately unlike the product's webrtcvad
    (a GMM) so that the two disagree the way two real VADs do.

    Each 20 ms frame is speech when its level is `threshold_db` above an adaptive noise floor
    and above `min_level_dbfs`, and its zero-crossing rate is voice-like (hiss crosses zero
    about every other sample, voiced speech far less). The floor falls fast to quieter frames
    and rises slowly, so a steady background stops counting after a few seconds. A turn starts
    once `start_s` of speech has accumulated (gaps over 100 ms reset it, so a cough does not
    count) and ends after `end_s` without speech.
    """

    FRAME_S = 0.02

    def __init__(
        self,
        start_s: float = 0.2,
        end_s: float = 0.6,
        *,
        rate: int = INPUT_RATE,
        threshold_db: float = 12.0,
        min_level_dbfs: float = -50.0,
        max_zero_crossings: float = 0.3,
    ) -> None:
        self._frame_bytes = int(rate * self.FRAME_S) * 2
        self._start_frames = max(1, round(start_s / self.FRAME_S))
        self._end_frames = max(1, round(end_s / self.FRAME_S))
        self._reset_frames = round(0.1 / self.FRAME_S)
        self._threshold_db = threshold_db
        self._min_level = min_level_dbfs
        self._max_zcr = max_zero_crossings
        self._floor = -70.0
        self._pending = b""
        self._utterance = bytearray()
        self._speech_end = 0
        self._speech_frames = 0
        self._gap_frames = 0
        self.in_speech = False

    def feed(self, pcm: bytes) -> list[SpeechEvent]:
        data = self._pending + pcm
        usable = len(data) - len(data) % self._frame_bytes
        self._pending = data[usable:]
        events = []
        for i in range(0, usable, self._frame_bytes):
            event = self._step(data[i : i + self._frame_bytes])
            if event is not None:
                events.append(event)
        return events

    def end(self) -> SpeechEvent | None:
        """Ends the current utterance now (audioStreamEnd): the caller's audio has stopped."""
        return self._finish() if self.in_speech else None

    def _classify(self, frame: np.ndarray) -> bool:
        level = 10 * math.log10(float(np.mean(frame**2)) / 32768**2 + 1e-12)
        zcr = float(np.mean(np.signbit(frame[1:]) != np.signbit(frame[:-1])))
        speech = (
            level >= self._min_level
            and level >= self._floor + self._threshold_db
            and zcr <= self._max_zcr
        )
        if level < self._floor:
            self._floor += 0.5 * (level - self._floor)
        else:
            self._floor += min(level - self._floor, 0.1)
        self._floor = max(self._floor, -90.0)
        return speech

    def _step(self, frame: bytes) -> SpeechEvent | None:
        speech = self._classify(np.frombuffer(frame, "<i2").astype(np.float64))
        if speech or self._utterance:
            self._utterance += frame
        if speech:
            self._gap_frames = 0
            self._speech_end = len(self._utterance)
            if not self.in_speech:
                self._speech_frames += 1
                if self._speech_frames >= self._start_frames:
                    self.in_speech = True
                    return SpeechEvent("start")
            return None
        self._gap_frames += 1
        if self.in_speech:
            return self._finish() if self._gap_frames >= self._end_frames else None
        if self._gap_frames > self._reset_frames:
            self._utterance.clear()
            self._speech_frames = 0
        return None

    def _finish(self) -> SpeechEvent:
        pcm = bytes(self._utterance[: self._speech_end])
        self._utterance.clear()
        self._speech_frames = self._gap_frames = self._speech_end = 0
        self.in_speech = False
        return SpeechEvent("end", pcm)


# --- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceBehaviour:
    """Timings of the stand-in; the defaults and allowed ranges are the real service's.

    A setup's `automaticActivityDetection.prefixPaddingMs` / `silenceDurationMs` override the
    VAD timings for that connection, as they do on the real service.
    """

    vad_start_s: float = 0.2
    vad_end_s: float = 0.6
    reply_speed: float = 3.0
    """Reply audio is generated this many times faster than real time."""
    chunk_s: float = 0.04
    setup_delay_s: float = 0.0
    text_reply_max_s: float = 2.0
    transcription_lag_s: float = 0.3
    """The recognizer's last words of a turn arrive this long after the turn ended (the reply
    may have begun), as the real service's often do: an input transcription is no answer."""

    def __post_init__(self) -> None:
        if not 0.5 <= self.vad_end_s <= 0.8:
            raise ValueError("vad_end_s: the real service ends a turn after 0.5-0.8 s of silence")
        if not 2.0 <= self.reply_speed <= 4.0:
            raise ValueError("reply_speed: the real service generates 2-4x faster than real time")
        if (
            self.vad_start_s <= 0
            or self.chunk_s <= 0
            or self.setup_delay_s < 0
            or self.transcription_lag_s < 0
        ):
            raise ValueError("timings must be positive")

    @property
    def chunk_bytes(self) -> int:
        return int(OUTPUT_RATE * self.chunk_s) * 2


@dataclass(frozen=True)
class ModelRules:
    """What differs between model families, matched by prefix of the model name."""

    prefix: str
    refused_setup: tuple[str, ...]
    """Setup fields closed with 1007 for this family."""
    ignored_setup: tuple[str, ...]
    """Setup fields (dotted camelCase paths) accepted and silently dropped."""
    text_interrupts: bool
    """A text turn with turnComplete interrupts a reply being generated (else it waits)."""
    turn_complete_after_tool_call: bool


MODEL_RULES: tuple[ModelRules, ...] = (
    ModelRules(
        "gemini-3",
        refused_setup=("proactivity",),
        ignored_setup=("generationConfig.enableAffectiveDialog",),
        text_interrupts=True,
        turn_complete_after_tool_call=False,
    ),
    ModelRules(
        "",
        refused_setup=(),
        ignored_setup=(),
        text_interrupts=False,
        turn_complete_after_tool_call=True,
    ),
)


def _rules_for(model: str) -> ModelRules:
    name = model.removeprefix("models/")
    return next(r for r in MODEL_RULES if name.startswith(r.prefix))


class FaultKind(enum.Enum):
    GO_AWAY = "go_away"
    DROP = "drop"
    CLOSE = "close"
    STALL = "stall"
    TOOL_CALL = "tool_call"
    SLOW_SETUP = "slow_setup"


@dataclass(frozen=True)
class FaultPlan:
    """A misbehaviour of one connection, built with the class methods.

    When go_away, drop and close fire: `after_s` seconds after setupComplete once idle; or
    right after the `after_turns`-th turnComplete (and its resumption update); or, with
    `chunks`, after that many audio chunks into the first reply that long once `after_turns`
    turns are complete. With no trigger they fire right after setup (accept-then-drop is
    `FaultPlan.drop()` given to `GeminiLiveService.always`). Every turnComplete counts,
    including interrupted turns and the one that follows a tool call.
    """

    kind: FaultKind
    after_s: float | None = None
    after_turns: int = 0
    chunks: int | None = None
    time_left_s: float = 2.0
    close_code: int = 1011
    tool_name: str = ""
    tool_args: dict[str, Any] = field(default_factory=dict)
    delay_s: float = 0.0

    @classmethod
    def go_away(
        cls,
        *,
        after_s: float | None = None,
        after_turns: int = 0,
        chunks: int | None = None,
        time_left_s: float = 2.0,
    ) -> FaultPlan:
        """`goAway {timeLeft}`, then a 1000 close when the time is up."""
        return cls(FaultKind.GO_AWAY, after_s, after_turns, chunks, time_left_s=time_left_s)

    @classmethod
    def drop(
        cls, *, after_s: float | None = None, after_turns: int = 0, chunks: int | None = None
    ) -> FaultPlan:
        """The transport aborted with no close frame (the client sees 1006)."""
        return cls(FaultKind.DROP, after_s, after_turns, chunks)

    @classmethod
    def close(
        cls,
        code: int = 1011,
        *,
        after_s: float | None = None,
        after_turns: int = 0,
        chunks: int | None = None,
    ) -> FaultPlan:
        return cls(FaultKind.CLOSE, after_s, after_turns, chunks, close_code=code)

    @classmethod
    def stall(cls) -> FaultPlan:
        """Transcribes the caller's input but never answers."""
        return cls(FaultKind.STALL)

    @classmethod
    def tool_call(
        cls, name: str, args: dict[str, Any] | None = None, *, after_turns: int = 0
    ) -> FaultPlan:
        """The reply that starts once `after_turns` turns are complete begins with a toolCall;
        the reply follows the toolResponse."""
        return cls(
            FaultKind.TOOL_CALL, after_turns=after_turns, tool_name=name, tool_args=dict(args or {})
        )

    @classmethod
    def slow_setup(cls, delay_s: float) -> FaultPlan:
        return cls(FaultKind.SLOW_SETUP, delay_s=delay_s)

    @property
    def closes(self) -> bool:
        return self.kind in (FaultKind.GO_AWAY, FaultKind.DROP, FaultKind.CLOSE)


# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextTurn:
    """One entry of the model's context: what it was told or generated."""

    role: str
    text: str
    audio_s: float = 0.0


@dataclass
class ConnectionRecord:
    """Everything one connection received and sent, for tests to assert on.

    Times are `time.monotonic()` so that clients on any event loop or thread can compare.
    """

    path: str
    opened_at: float
    closed_at: float | None = None
    close_code: int | None = None
    """The code the service closed with, else the client's (1006: no close frame)."""
    close_reason: str = ""
    setup: dict[str, Any] | None = None
    model: str | None = None
    resumed_handle: str | None = None
    fault: FaultPlan | None = None
    ignored_fields: list[str] = field(default_factory=list)
    text_turns: list[str] = field(default_factory=list)
    """The text of each clientContent turn (any role) and each realtimeInput text."""
    audio_s: float = 0.0
    audio_stream_ends: int = 0
    input_forms: set[str] = field(default_factory=set)
    """realtimeInput fields seen: mediaChunks, audio, audioStreamEnd, activityStart, ..."""
    tool_responses: list[dict[str, Any]] = field(default_factory=list)
    context: list[ContextTurn] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    """Kinds of the frames sent, e.g. "setupComplete", "modelTurn", "turnComplete+usageMetadata"."""


# --- setup validation -------------------------------------------------------------------------

_Schema = dict[str, "_Schema | None"]

_SETUP_SCHEMA: _Schema = {
    "model": None,
    "generationConfig": {
        **dict.fromkeys(
            [
                "candidateCount",
                "maxOutputTokens",
                "temperature",
                "topP",
                "topK",
                "presencePenalty",
                "frequencyPenalty",
                "responseModalities",
                "mediaResolution",
                "seed",
                "enableAffectiveDialog",
                "thinkingConfig",
            ]
        ),
        "speechConfig": dict.fromkeys(["voiceConfig", "languageCode", "multiSpeakerVoiceConfig"]),
    },
    "systemInstruction": None,
    "tools": None,
    "realtimeInputConfig": {
        "automaticActivityDetection": dict.fromkeys(
            [
                "disabled",
                "startOfSpeechSensitivity",
                "endOfSpeechSensitivity",
                "prefixPaddingMs",
                "silenceDurationMs",
            ]
        ),
        "activityHandling": None,
        "turnCoverage": None,
    },
    "sessionResumption": dict.fromkeys(["handle", "transparent"]),
    "contextWindowCompression": {
        "triggerTokens": None,
        "slidingWindow": {"targetTokens": None},
    },
    "inputAudioTranscription": None,
    "outputAudioTranscription": None,
    "proactivity": {"proactiveAudio": None},
    "explicitVadSignal": None,
    "historyConfig": {"initialHistoryInClientContent": None},
}
_MESSAGE_SCHEMA: _Schema = {
    "setup": None,
    "clientContent": dict.fromkeys(["turns", "turnComplete"]),
    "realtimeInput": dict.fromkeys(
        ["mediaChunks", "audio", "video", "text", "audioStreamEnd", "activityStart", "activityEnd"]
    ),
    "toolResponse": {"functionResponses": None},
}


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _snake(key: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "_" + m.group().lower(), key)


def _get(obj: Any, *path: str) -> Any:
    """A field by camelCase path, whichever case the client used (the service accepts both)."""
    for name in path:
        if not isinstance(obj, dict):
            return None
        obj = next((v for k, v in obj.items() if _camel(k) == name), None)
    return obj


def _schema_error(obj: Any, schema: _Schema, where: str) -> str | None:
    """The proto JSON parser's complaint about `obj`, or None when it fits the schema."""
    if not isinstance(obj, dict):
        return f"Invalid JSON payload received. Invalid value at '{where}': expected an object."
    for key, value in obj.items():
        name = _camel(key)
        if name not in schema:
            return (
                f"Invalid JSON payload received. Unknown name \"{key}\" at '{where}': "
                "Cannot find field."
            )
        nested = schema[name]
        if nested is not None:
            if error := _schema_error(value, nested, f"{where}.{_snake(name)}"):
                return error
    return None


def _setup_error(setup: Any, rules: ModelRules) -> str | None:
    if error := _schema_error(setup, _SETUP_SCHEMA, "setup"):
        return error
    model = _get(setup, "model")
    if not isinstance(model, str) or not model.startswith("models/") or model == "models/":
        return f"Invalid model {model!r}: expected models/<name>."
    for path in rules.refused_setup:
        if _get(setup, *path.split(".")) is not None:
            return f"{_snake(path.split('.')[-1])} is not supported for {model}."
    return None


def _b64(data: Any) -> bytes:
    """Standard or URL-safe base64, padded or not (google-genai sends URL-safe)."""
    if not isinstance(data, str):
        raise _Rejected(1007, "Invalid JSON payload received. Invalid value: expected bytes.")
    text = data.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise _Rejected(1007, "Invalid value: bad base64 data.") from None


class _Rejected(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


# --- one connection ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reply:
    pcm: bytes
    """24 kHz PCM16."""
    text: str


class _Connection:
    """One client session: reads the client's frames while a worker generates replies, so
    that the caller's speech can interrupt a reply in progress."""

    def __init__(self, service: GeminiLiveService, ws: ServerConnection) -> None:
        self.service = service
        self.ws = ws
        self.record = ConnectionRecord(path=ws.request.path, opened_at=time.monotonic())
        self.behaviour = service.behaviour
        self.plan: FaultPlan | None = None
        self.rules = MODEL_RULES[-1]
        self.setup: dict[str, Any] = {}
        self.vad: SpeechDetector
        self.manual_activity: bytearray | None = None
        """The open activity's audio when the client signals turns itself (else None)."""
        self.activity_open = False
        self.history_phase = False
        self.replies: asyncio.Queue[_Reply] = asyncio.Queue()
        self.interrupt = asyncio.Event()
        self.idle = asyncio.Event()
        self.generating = False
        self.turns = 0
        self.fired = False
        self.tool_result: asyncio.Future[None] | None = None
        self.tasks: list[asyncio.Task[None]] = []

    # -- lifecycle --

    async def run(self) -> None:
        try:
            await self._open()
            await self._read()
        except _Rejected as exc:
            await self._close(exc.code, exc.reason)
        except ConnectionClosed:
            pass
        except Exception:
            await self._close(1011, _INTERNAL_REASON)
            raise
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            await self.ws.wait_closed()
            self.record.closed_at = time.monotonic()
            if self.record.close_code is None:
                self.record.close_code = self.ws.close_code or 1006
                self.record.close_reason = self.ws.close_reason or ""

    async def _open(self) -> None:
        first = self._parse(await self.ws.recv())
        if not self.ws.request.headers.get("x-goog-api-key"):
            # after reading the setup: a client whose send raced the close would see a
            # transport error instead of the reason
            raise _Rejected(1008, _NO_KEY_REASON)
        setup = _get(first, "setup")
        if setup is None or len(first) != 1:
            raise _Rejected(1007, "The first message must be a setup message.")
        self.record.setup = setup
        model = _get(setup, "model")
        self.rules = _rules_for(model) if isinstance(model, str) else self.rules
        if error := _setup_error(setup, self.rules):
            raise _Rejected(1007, error)
        self.setup = setup
        self.record.model = model
        self.record.ignored_fields = [
            p for p in self.rules.ignored_setup if _get(setup, *p.split(".")) is not None
        ]
        handle = _get(setup, "sessionResumption", "handle")
        if handle is not None:
            if handle not in self.service.handles:
                raise _Rejected(1007, "Invalid session resumption handle.")
            self.record.resumed_handle = handle
            self.record.context = list(self.service.handles[handle])
        detection = _get(setup, "realtimeInputConfig", "automaticActivityDetection") or {}
        if _get(detection, "disabled"):
            self.manual_activity = bytearray()
        self.vad = SpeechDetector(
            (_get(detection, "prefixPaddingMs") or self.behaviour.vad_start_s * 1000) / 1000,
            (_get(detection, "silenceDurationMs") or self.behaviour.vad_end_s * 1000) / 1000,
        )
        self.history_phase = bool(_get(setup, "historyConfig", "initialHistoryInClientContent"))
        self.plan = self.record.fault = self.service._next_plan()
        delay = self.behaviour.setup_delay_s
        if self.plan is not None and self.plan.kind is FaultKind.SLOW_SETUP:
            delay += self.plan.delay_s
        await asyncio.sleep(delay)
        await self._send({"setupComplete": {}})
        await self._went_idle()
        self.tasks.append(asyncio.create_task(self._generate_replies()))
        if self.plan is not None and self.plan.closes:
            if self.plan.after_s is not None:
                self.tasks.append(asyncio.create_task(self._fire_when_idle(self.plan.after_s)))
            elif self.plan.chunks is None and self.plan.after_turns == 0:
                await self._fire()

    async def _read(self) -> None:
        async for raw in self.ws:
            message = self._parse(raw)
            if error := _schema_error(message, _MESSAGE_SCHEMA, "message"):
                raise _Rejected(1007, error)
            if len(message) != 1:
                raise _Rejected(1007, "A message must set exactly one of its fields.")
            ((key, body),) = message.items()
            match _camel(key):
                case "setup":
                    raise _Rejected(1007, "Setup may only be sent once, as the first message.")
                case "clientContent":
                    await self._client_content(body)
                case "realtimeInput":
                    await self._realtime_input(body)
                case "toolResponse":
                    self._tool_response(body)

    @staticmethod
    def _parse(raw: str | bytes) -> dict[str, Any]:
        try:
            message = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Rejected(1007, "Invalid JSON payload received.") from None
        if not isinstance(message, dict):
            raise _Rejected(1007, "Invalid JSON payload received. Expected an object.")
        return message

    async def _send(self, message: dict[str, Any]) -> None:
        """JSON in binary frames, as the real service sends them (browsers get a Blob)."""
        kinds = [
            inner
            for key, value in message.items()
            for inner in (value if key == "serverContent" else [key])
        ]
        self.record.sent.append("+".join(kinds))
        await self.ws.send(json.dumps(message).encode())

    async def _close(self, code: int, reason: str) -> None:
        reason = reason.encode()[:123].decode(errors="ignore")
        if self.record.close_code is None:
            self.record.close_code, self.record.close_reason = code, reason
        await self.ws.close(code, reason)

    # -- client messages --

    async def _client_content(self, body: dict[str, Any]) -> None:
        turns = _get(body, "turns") or []
        texts = []
        for turn in turns:
            text = "".join(_get(part, "text") or "" for part in _get(turn, "parts") or [])
            self.record.text_turns.append(text)
            self.record.context.append(ContextTurn(_get(turn, "role") or "user", text))
            texts.append(text)
        if _get(body, "turnComplete") and not self.history_phase:
            await self._text_turn(texts[-1] if texts else "")

    async def _text_turn(self, text: str) -> None:
        if self.plan is not None and self.plan.kind is FaultKind.STALL:
            return
        if self.rules.text_interrupts and self.generating:
            self._barge_in()
        seconds = min(self.behaviour.text_reply_max_s, max(0.5, 0.06 * len(text)))
        topic = text.strip().strip("()")[:80]
        self._enqueue(_Reply(voiced_audio(seconds), f"(reply to: {topic})"))

    async def _realtime_input(self, body: dict[str, Any]) -> None:
        self.history_phase = False
        for key, value in body.items():
            name = _camel(key)
            self.record.input_forms.add(name)
            if name == "mediaChunks":
                for chunk in value or []:
                    await self._audio(chunk)
            elif name == "audio":
                await self._audio(value)
            elif name == "text":
                self.record.text_turns.append(value)
                self.record.context.append(ContextTurn("user", value))
                await self._text_turn(value)
            elif name == "audioStreamEnd" and value:
                self.record.audio_stream_ends += 1
                if self.manual_activity is None and (event := self.vad.end()):
                    await self._utterance(event.pcm)
            elif name in ("activityStart", "activityEnd"):
                await self._activity(name)

    async def _audio(self, blob: Any) -> None:
        mime = _get(blob, "mimeType") or ""
        pcm = _b64(_get(blob, "data"))
        if not mime.startswith("audio/pcm"):
            return
        match = re.search(r"rate=(\d+)", mime)
        rate = int(match.group(1)) if match else INPUT_RATE
        self.record.audio_s += len(pcm) / 2 / rate
        pcm = resample(pcm, rate, INPUT_RATE)
        if self.manual_activity is not None:
            if self.activity_open:
                self.manual_activity += pcm
            return
        for event in self.vad.feed(pcm):
            if event.kind == "start":
                self._barge_in()
            else:
                await self._utterance(event.pcm)

    async def _activity(self, name: str) -> None:
        """Explicit turns: the client's own VAD replaces the service's."""
        if self.manual_activity is None:
            raise _Rejected(
                1007,
                f"{_snake(name)} is only allowed when automatic activity detection is disabled.",
            )
        if name == "activityStart":
            self.activity_open = True
            self.manual_activity.clear()
            self._barge_in()
        elif self.activity_open:
            self.activity_open = False
            await self._utterance(bytes(self.manual_activity))

    def _barge_in(self) -> None:
        """Caller activity while generating interrupts the reply (unless the setup says not)."""
        handling = _get(self.setup, "realtimeInputConfig", "activityHandling")
        if self.generating and handling != "NO_INTERRUPTION":
            self.interrupt.set()
            while not self.replies.empty():
                self.replies.get_nowait()

    async def _utterance(self, pcm: bytes) -> None:
        seconds = len(pcm) / 2 / INPUT_RATE
        text = f"(caller speech {seconds:.1f} s)"
        if _get(self.setup, "inputAudioTranscription") is not None:
            head, tail = text.split(" ", 1)
            await self._send({"serverContent": {"inputTranscription": {"text": head}}})
            self.tasks = [task for task in self.tasks if not task.done()]
            self.tasks.append(asyncio.create_task(self._late_transcription(" " + tail)))
        self.record.context.append(ContextTurn("user", text, seconds))
        if self.plan is not None and self.plan.kind is FaultKind.STALL:
            return
        echo = resample(pcm, INPUT_RATE, OUTPUT_RATE)
        self._enqueue(_Reply(echo, f"(echo of {seconds:.1f} s of caller speech)"))

    async def _late_transcription(self, text: str) -> None:
        await asyncio.sleep(self.behaviour.transcription_lag_s)
        await self._send({"serverContent": {"inputTranscription": {"text": text}}})

    def _tool_response(self, body: dict[str, Any]) -> None:
        for response in _get(body, "functionResponses") or []:
            self.record.tool_responses.append(response)
            self.record.context.append(ContextTurn("tool", json.dumps(response)))
        if self.tool_result is not None and not self.tool_result.done():
            self.tool_result.set_result(None)

    # -- generation --

    def _enqueue(self, reply: _Reply) -> None:
        self.idle.clear()
        self.replies.put_nowait(reply)

    async def _generate_replies(self) -> None:
        while True:
            reply = await self.replies.get()
            try:
                if await self._generate(reply):
                    return
            except ConnectionClosed:
                return

    async def _generate(self, reply: _Reply) -> bool:
        """Streams one reply; True when a fault ended the connection."""
        await self._resumable_update(False)
        if (plan := self._due(FaultKind.TOOL_CALL)) is not None:
            self.fired = True
            await self._call_tool(plan)
        chunk_bytes = self.behaviour.chunk_bytes
        chunks = [reply.pcm[i : i + chunk_bytes] for i in range(0, len(reply.pcm), chunk_bytes)]
        words = reply.text.split()
        said = 0
        audio_bytes = 0
        interrupted = False
        self.generating = True
        self.interrupt.clear()
        start = asyncio.get_running_loop().time()
        for i, chunk in enumerate(chunks):
            deadline = start + i * self.behaviour.chunk_s / self.behaviour.reply_speed
            if await self._interrupted_before(deadline):
                interrupted = True
                break
            await self._send(
                {
                    "serverContent": {
                        "modelTurn": {
                            "parts": [
                                {
                                    "inlineData": {
                                        "mimeType": OUTPUT_MIME,
                                        "data": base64.b64encode(chunk).decode(),
                                    }
                                }
                            ]
                        }
                    }
                }
            )
            audio_bytes += len(chunk)
            due = len(words) * audio_bytes // len(reply.pcm)
            if due > said:
                await self._output_transcription(" ".join(words[said:due]), said > 0)
                said = due
            plan = self._due()
            if plan is not None and plan.chunks is not None and i + 1 >= plan.chunks:
                if await self._fire():
                    return True
        self.generating = False
        if not interrupted and said < len(words):
            await self._output_transcription(" ".join(words[said:]), said > 0)
            said = len(words)
        seconds = audio_bytes / 2 / OUTPUT_RATE
        text = " ".join(words[:said])
        usage = self._usage(seconds, text)
        self.record.context.append(ContextTurn("model", text, seconds))
        if interrupted:
            await self._send({"serverContent": {"interrupted": True}})
        else:
            await self._send({"serverContent": {"generationComplete": True}})
        return await self._turn_complete(usage)

    async def _call_tool(self, plan: FaultPlan) -> None:
        """2.5 models follow a toolCall with turnComplete; 3.x models wait for the response."""
        call_id = f"function-call-{next(self.service._call_ids)}"
        call = {"id": call_id, "name": plan.tool_name, "args": plan.tool_args}
        self.tool_result = asyncio.get_running_loop().create_future()
        await self._send({"toolCall": {"functionCalls": [call]}})
        self.record.context.append(ContextTurn("model", json.dumps({"functionCall": call})))
        if self.rules.turn_complete_after_tool_call:
            self.turns += 1
            await self._send(
                {
                    "serverContent": {"turnComplete": True},
                    "usageMetadata": self._usage(0.0, json.dumps(call)),
                }
            )
        await self.tool_result
        self.tool_result = None

    async def _output_transcription(self, text: str, continues: bool) -> None:
        if _get(self.setup, "outputAudioTranscription") is not None:
            piece = f" {text}" if continues else text
            await self._send({"serverContent": {"outputTranscription": {"text": piece}}})

    async def _interrupted_before(self, deadline: float) -> bool:
        timeout = deadline - asyncio.get_running_loop().time()
        if self.interrupt.is_set():
            return True
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self.interrupt.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _turn_complete(self, usage: dict[str, int]) -> bool:
        self.turns += 1
        await self._send({"serverContent": {"turnComplete": True}, "usageMetadata": usage})
        if self.replies.empty():
            await self._went_idle()
        plan = self._due()
        if plan is not None and plan.after_s is None and plan.chunks is None:
            return await self._fire()
        return False

    def _usage(self, reply_s: float, reply_text: str) -> dict[str, int]:
        """Estimates in Gemini's units: 32 tokens per second of audio, ~4 characters a token."""
        system = _get(self.setup, "systemInstruction", "parts") or []
        prompt = sum(len(_get(p, "text") or "") for p in system) // 4 + sum(
            round(t.audio_s * AUDIO_TOKENS_PER_S) + len(t.text) // 4 for t in self.record.context
        )
        response = round(reply_s * AUDIO_TOKENS_PER_S) + len(reply_text) // 4
        return {
            "promptTokenCount": prompt,
            "responseTokenCount": response,
            "totalTokenCount": prompt + response,
        }

    async def _went_idle(self) -> None:
        self.idle.set()
        await self._resumable_update(True)

    async def _resumable_update(self, resumable: bool) -> None:
        """A fresh handle whenever idle; `{"resumable": false}` (no handle) while busy."""
        if _get(self.setup, "sessionResumption") is None:
            return
        if not resumable:
            await self._send({"sessionResumptionUpdate": {"resumable": False}})
            return
        handle = f"standin-handle-{next(self.service._handle_ids)}"
        self.service.handles[handle] = tuple(self.record.context)
        await self._send({"sessionResumptionUpdate": {"newHandle": handle, "resumable": True}})

    # -- faults --

    def _due(self, kind: FaultKind | None = None) -> FaultPlan | None:
        """The plan, if it has not fired, enough turns are complete and it is of `kind` (by
        default any kind that ends the connection)."""
        plan = self.plan
        if plan is None or self.fired or self.turns < plan.after_turns:
            return None
        return plan if (plan.kind is kind if kind else plan.closes) else None

    async def _fire_when_idle(self, after_s: float) -> None:
        await asyncio.sleep(after_s)
        await self.idle.wait()
        if not self.fired:
            await self._fire()

    async def _fire(self) -> bool:
        """Applies the plan's fault; True when the connection is gone."""
        assert self.plan is not None
        self.fired = True
        match self.plan.kind:
            case FaultKind.GO_AWAY:
                await self._send({"goAway": {"timeLeft": f"{self.plan.time_left_s:g}s"}})
                self.tasks.append(asyncio.create_task(self._close_after(self.plan.time_left_s)))
                return False
            case FaultKind.DROP:
                self.record.close_code = 1006
                self.ws.transport.abort()
            case _:
                await self._close(
                    self.plan.close_code, _INTERNAL_REASON if self.plan.close_code == 1011 else ""
                )
        return True

    async def _close_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self._close(1000, "")


# --- the service ------------------------------------------------------------------------------


class GeminiLiveService(LoopbackService):
    """The stand-in service on 127.0.0.1 (a free port), with TLS from a fresh test CA.

    Use as `async with GeminiLiveService() as service:`, or `running_in_thread()` from
    synchronous code. Clients may be on any event loop or thread.

    Refusals are close codes as on the real service: 1007 for a bad setup or message (the
    reason names the field). Two cannot be checked offline and are best guesses: 1008 without
    an API key (sent after reading the setup), 1007 for an unknown resumption handle.
    """

    def __init__(self, behaviour: ServiceBehaviour | None = None) -> None:
        self.behaviour = behaviour or ServiceBehaviour()
        self.connections: list[ConnectionRecord] = []
        self.handles: dict[str, tuple[ContextTurn, ...]] = {}
        """Resumption handles, service-wide: each restores the context as it was when issued."""
        self._handle_ids = itertools.count(1)
        self._call_ids = itertools.count(1)
        self._plans: deque[FaultPlan] = deque()
        self._always: FaultPlan | None = None
        self._server: Server | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        if self._tmp is None:
            raise RuntimeError("the service is not started")
        return Path(self._tmp.name) / "ca.pem"

    def url(self, api_version: str = "v1alpha") -> str:
        """The WebSocket URL google-genai builds from `base_url` (for raw clients)."""
        return (
            f"wss://127.0.0.1:{self.port}/ws/google.ai.generativelanguage.{api_version}"
            ".GenerativeService.BidiGenerateContent"
        )

    def environ(self) -> dict[str, str]:
        """Environment that points google-genai (and so ADK's default agent) at the service."""
        return {
            "GOOGLE_GEMINI_BASE_URL": self.base_url,
            "SSL_CERT_FILE": str(self.ca_file),
            "GOOGLE_API_KEY": "standin-key",
            "GOOGLE_GENAI_USE_VERTEXAI": "false",
            "GOOGLE_GENAI_USE_ENTERPRISE": "false",  # its newer name, which wins when both are set
        }

    def ssl_context(self) -> ssl.SSLContext:
        """A client context trusting the service's CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def plan(self, *plans: FaultPlan) -> None:
        """Queues one fault plan per coming connection, in order."""
        self._plans.extend(plans)

    def always(self, plan: FaultPlan | None) -> None:
        """Applies `plan` to every connection that has no queued plan (None: stop)."""
        self._always = plan

    def _next_plan(self) -> FaultPlan | None:
        return self._plans.popleft() if self._plans else self._always

    async def start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="gemini-live-")
        import trustme  # a test dependency (telephony[test]): servers never get here

        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(self.ca_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            0,
            ssl=context,
            process_request=self._check_path,
            max_size=None,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @staticmethod
    def _check_path(connection: ServerConnection, request: Request) -> Response | None:
        if _PATH.fullmatch(request.path.partition("?")[0]):
            return None
        return connection.respond(404, "Not Found\n")

    async def _handle(self, ws: ServerConnection) -> None:
        connection = _Connection(self, ws)
        self.connections.append(connection.record)
        await connection.run()


@contextmanager
def running_in_thread(behaviour: ServiceBehaviour | None = None) -> Iterator[GeminiLiveService]:
    """The service on its own event loop in a daemon thread, for synchronous callers."""
    with in_thread(GeminiLiveService(behaviour), "gemini-live-standin") as service:
        yield service
