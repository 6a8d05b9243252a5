"""Calls recorded in a replayable form: one JSON Lines file per call, plus a stereo WAV.

Format (version 1), one JSON object per line, `t` in seconds on the server's monotonic clock
from the moment the call was answered (the voice webhook):

    {"format": "telephony-call", "version": 1, "call_sid": ..., "caller": ..., "callee": ...,
     "agent": ..., "started": "2026-11-23T17:00:00.000+00:00"}
    {"t": 0.412, "kind": "in", "msg": {...}}     a Media Streams message from Twilio
    {"t": 0.415, "kind": "out", "msg": {...}}    a message we sent to Twilio
    {"t": 0.401, "kind": "model", "event": "audio", "bytes": 1920}
    {"t": 2.730, "kind": "model", "event": "input_transcription", "text": ..., "finished": true}
        (also "output_transcription", "interrupted", "turn_complete",
         "tool_call" with "name" and "args", "tool_response" with "name")
    {"t": 3.100, "kind": "call", "event": "barge_in", "source": "caller"}
        what the bridge decided: "hold" and "resume" (a sound over the agent that was no
        interruption after all), "barge_in", "heard" (the note of what the caller heard of a
        reply they cut off: "heard", "unheard", "heard_s", "generated_s"), "reconnect" (a new
        live connection; "restarts" and "reconnects" so far), "released" (the stream let go
        for Twilio to play the agent's keys, "digits"; a new `start` follows on the same
        call). Recordings made before these lines existed have none; readers skip call events
        they do not know.
    {"t": 9.002, "kind": "end", "reason": "caller hung up (stop)"}

The file is flushed about once a second, so a server that dies mid-call leaves a file that
loads up to its last complete line. The WAV holds the call as heard: the caller on the left,
the agent on the right as Twilio played it (cut where a `clear` cut it), both at 8 kHz.
"""

from __future__ import annotations

import datetime
import gzip
import json
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from google.adk.events import Event

from ..audio import mulaw_decode
from ..twilio.media_stream import Clear, InboundEvent, Media, PlayMedia, Start, parse_outbound

__all__ = [
    "FORMAT",
    "VERSION",
    "CallRecorder",
    "Entry",
    "Recording",
    "RecordingError",
    "load_recording",
]

log = logging.getLogger(__name__)

FORMAT = "telephony-call"
VERSION = 1
KINDS = frozenset({"in", "out", "model", "call", "end"})
MODEL_EVENTS = frozenset(
    {
        "audio",
        "input_transcription",
        "output_transcription",
        "interrupted",
        "turn_complete",
        "tool_call",
        "tool_response",
    }
)
RATE = 8000
FLUSH_EVERY_S = 1.0
SETTLED_S = 1.0
"""The WAV is written this far behind the clock: caller frames may still arrive late."""


class RecordingError(ValueError):
    """A recording that cannot be read, with the line at fault."""


@dataclass(frozen=True)
class Entry:
    t: float
    kind: str
    data: dict[str, Any]


@dataclass
class Recording:
    """A loaded recording. `truncated` is set when the last line was cut short."""

    header: dict[str, Any]
    entries: list[Entry] = field(default_factory=list)
    truncated: bool = False

    def twilio_in(self) -> list[tuple[float, dict[str, Any]]]:
        return [(e.t, e.data["msg"]) for e in self.entries if e.kind == "in"]

    def twilio_out(self) -> list[tuple[float, dict[str, Any]]]:
        return [(e.t, e.data["msg"]) for e in self.entries if e.kind == "out"]

    def model(self, event: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == "model" and e.data["event"] == event]

    def transcripts(self, which: str) -> list[str]:
        """Finished transcriptions, "input" (the caller) or "output" (the agent)."""
        return [
            str(e.data.get("text", ""))
            for e in self.model(f"{which}_transcription")
            if e.data.get("finished")
        ]

    @property
    def stream_start(self) -> float | None:
        for t, msg in self.twilio_in():
            if msg.get("event") == "start":
                return t
        return None

    @property
    def end_reason(self) -> str | None:
        ends = [e for e in self.entries if e.kind == "end"]
        return str(ends[-1].data.get("reason", "")) if ends else None

    def clear_times(self) -> list[float]:
        return [t for t, msg in self.twilio_out() if msg.get("event") == "clear"]


def load_recording(path: str | Path) -> Recording:
    """Reads and validates a recording (`.jsonl`, or `.jsonl.gz`)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise RecordingError(f"{path}: cannot read: {exc}") from exc
    if not text.strip():
        raise RecordingError(f"{path}: empty, expected a {FORMAT} header line")
    lines = text.split("\n")
    complete = text.endswith("\n")
    if complete:
        lines.pop()
    recording: Recording | None = None
    for number, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not complete and recording is not None:
                recording.truncated = True
                break
            raise RecordingError(f"{path}:{number}: not JSON: {exc}") from exc
        where = f"{path}:{number}"
        if recording is None:
            recording = Recording(_check_header(obj, where))
        else:
            recording.entries.append(_check_entry(obj, where))
    assert recording is not None  # the text was not empty, so line 1 was the header
    return recording


def _check_header(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise RecordingError(f"{where}: not a {FORMAT} recording (no header line)")
    version = obj.get("version")
    if version != VERSION:
        raise RecordingError(f"{where}: format version {version!r}; this telephony reads {VERSION}")
    for key in ("call_sid", "caller", "callee"):
        if not isinstance(obj.get(key), str):
            raise RecordingError(f"{where}: header field {key!r} must be a string")
    return obj


def _check_entry(obj: Any, where: str) -> Entry:
    if not isinstance(obj, dict):
        raise RecordingError(f"{where}: expected an object")
    t, kind = obj.get("t"), obj.get("kind")
    if not isinstance(t, int | float) or isinstance(t, bool) or t < 0:
        raise RecordingError(f"{where}: 't' must be a non-negative number, got {t!r}")
    if kind not in KINDS:
        raise RecordingError(f"{where}: 'kind' must be one of {sorted(KINDS)}, got {kind!r}")
    if kind in ("in", "out") and not (
        isinstance(obj.get("msg"), dict) and isinstance(obj["msg"].get("event"), str)
    ):
        raise RecordingError(f"{where}: 'msg' must be a Media Streams message object")
    if kind == "model" and obj.get("event") not in MODEL_EVENTS:
        raise RecordingError(f"{where}: unknown model event {obj.get('event')!r}")
    if kind == "call" and not isinstance(obj.get("event"), str):
        raise RecordingError(f"{where}: a call event needs an 'event' name")
    return Entry(float(t), kind, obj)


def model_entries(event: Event) -> list[dict[str, Any]]:
    """What of an ADK event goes into a recording (audio as a byte count only)."""
    out: list[dict[str, Any]] = []
    for part in (event.content.parts or []) if event.content else []:
        if part.inline_data and part.inline_data.data:
            out.append({"event": "audio", "bytes": len(part.inline_data.data)})
        if part.function_call:
            call = part.function_call
            out.append({"event": "tool_call", "name": call.name, "args": call.args or {}})
        if part.function_response:
            out.append({"event": "tool_response", "name": part.function_response.name})
    for which in ("input", "output"):
        transcription = getattr(event, f"{which}_transcription")
        if transcription and (transcription.text or transcription.finished):
            out.append(
                {
                    "event": f"{which}_transcription",
                    "text": transcription.text or "",
                    "finished": bool(transcription.finished),
                }
            )
    if event.interrupted:
        out.append({"event": "interrupted"})
    if event.turn_complete:
        out.append({"event": "turn_complete"})
    return out


class CallRecorder:
    """Writes one call's recording as it happens. The bridge calls it; it never raises into
    the call: a full disk costs the recording (logged once), not the call."""

    def __init__(
        self,
        directory: Path,
        *,
        call_sid: str,
        caller: str,
        callee: str,
        agent: str,
        clock: Callable[[], float],
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{call_sid}.jsonl"
        self.wav_path = directory / f"{call_sid}.wav"
        self._clock = clock
        self._t0 = clock()
        self._last_flush = 0.0
        self._file: IO[str] | None = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        self._wav = HeardWav(open(self.wav_path, "wb"))  # noqa: SIM115
        self._call_sid = call_sid
        self._stream_start: float | None = None
        self._stream_at = 0
        """Where the current media stream began in the WAV (its timestamps start at 0)."""
        self._line(
            json.dumps(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "call_sid": call_sid,
                    "caller": caller,
                    "callee": callee,
                    "agent": agent,
                    "started": datetime.datetime.now(datetime.UTC).isoformat(),
                }
            )
        )

    def _now(self) -> float:
        return self._clock() - self._t0

    def _line(self, text: str) -> None:
        if self._file is None:
            return
        try:
            self._file.write(text + "\n")
            now = self._now()
            if now - self._last_flush >= FLUSH_EVERY_S:
                self._file.flush()
                self._last_flush = now
                self._wav.commit(self._samples(now - SETTLED_S))
        except OSError as exc:
            log.error("call %s: recording stopped: %s", self._call_sid, exc)
            self._file = None

    def _samples(self, t: float) -> int:
        """Position in the WAV (which starts with the media stream) of time t."""
        return int((t - self._stream_start) * RATE) if self._stream_start is not None else 0

    def twilio_in(self, event: InboundEvent, at: float | None = None) -> None:
        """`at`: when it arrived, on the call's clock, if that was before now."""
        now = self._now() if at is None else at - self._t0
        self._line(f'{{"t":{now:.4f},"kind":"in","msg":{event.to_json()}}}')
        if isinstance(event, Start):
            if self._stream_start is None:
                self._stream_start = now
            self._stream_at = self._samples(now)
        elif isinstance(event, Media) and self._stream_start is not None:
            self._wav.caller(self._stream_at + event.timestamp * RATE // 1000, event.payload)

    def twilio_out(self, message: str) -> None:
        now = self._now()
        self._line(f'{{"t":{now:.4f},"kind":"out","msg":{message}}}')
        if self._stream_start is None:
            return
        event = parse_outbound(message)
        if isinstance(event, PlayMedia):
            self._wav.agent(self._samples(now), event.payload)
        elif isinstance(event, Clear):
            self._wav.clear(self._samples(now))

    def model_event(self, event: Event) -> None:
        now = self._now()
        for entry in model_entries(event):
            self._line(json.dumps({"t": round(now, 4), "kind": "model", **entry}))

    def call_event(self, event: str, **fields: Any) -> None:
        """What the bridge decided (see the module's docstring): a report shows it."""
        entry = {"t": round(self._now(), 4), "kind": "call", "event": event, **fields}
        self._line(json.dumps(entry))

    def close(self, reason: str) -> None:
        self._line(json.dumps({"t": round(self._now(), 4), "kind": "end", "reason": reason}))
        if self._file is not None:
            try:
                self._file.close()
                self._wav.close()
            except OSError as exc:
                log.error("call %s: recording not finished: %s", self._call_sid, exc)
            self._file = None


class HeardWav:
    """A stereo 8 kHz PCM16 WAV written as the call goes, a settled second behind it.

    The agent channel follows Twilio's playout: each media message starts where the previous
    one ends (or when it arrives, if later); a clear cuts everything not yet played."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._file.write(_wav_header(0))
        self._base = 0
        self._left = np.zeros(0, np.int16)
        self._right = np.zeros(0, np.int16)
        self._play_end = 0
        self._end = 0
        """Just past the last sample written (the buffers grow ahead of it)."""

    def _ensure(self, end: int) -> None:
        need = end - self._base
        if need > len(self._left):
            grow = max(need, 2 * len(self._left)) - len(self._left)
            self._left = np.concatenate((self._left, np.zeros(grow, np.int16)))
            self._right = np.concatenate((self._right, np.zeros(grow, np.int16)))

    def _put(self, channel: str, at: int, pcm: np.ndarray) -> None:
        if at < self._base:
            pcm = pcm[self._base - at :]
            at = self._base
        self._ensure(at + len(pcm))
        self._end = max(self._end, at + len(pcm))
        getattr(self, channel)[at - self._base : at - self._base + len(pcm)] = pcm

    def caller(self, at: int, mulaw: bytes) -> None:
        self._put("_left", at, np.frombuffer(mulaw_decode(mulaw), np.int16))

    def agent(self, now: int, mulaw: bytes) -> None:
        start = max(now, self._play_end)
        self._put("_right", start, np.frombuffer(mulaw_decode(mulaw), np.int16))
        self._play_end = start + len(mulaw)

    def clear(self, now: int) -> None:
        if self._play_end > now:
            lo = max(now, self._base) - self._base
            self._right[lo : self._play_end - self._base] = 0
        self._play_end = now

    def commit(self, upto: int) -> None:
        n = min(upto - self._base, len(self._left))
        if n <= 0:
            return
        frames = np.empty(2 * n, "<i2")
        frames[0::2], frames[1::2] = self._left[:n], self._right[:n]
        self._file.write(frames.tobytes())
        self._left, self._right = self._left[n:].copy(), self._right[n:].copy()
        self._base += n

    def finish(self) -> None:
        """Writes what is left and the final header; the file stays open."""
        self.commit(max(self._end, self._play_end))
        self._file.seek(0)
        self._file.write(_wav_header(self._base))

    def close(self) -> None:
        self.finish()
        self._file.close()


def _wav_header(frames: int) -> bytes:
    data = frames * 4
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 2, RATE, RATE * 4, 4, 16)
        + b"data"
        + struct.pack("<I", data)
    )
