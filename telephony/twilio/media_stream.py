"""Twilio Media Streams messages as typed objects: a pure codec, no I/O.

`parse()` turns one WebSocket text frame from Twilio into an event object or raises
`ProtocolError` naming the field at fault; the `*_message()` builders produce what we send.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Clear",
    "Connected",
    "Dtmf",
    "InboundEvent",
    "Mark",
    "Media",
    "OutboundEvent",
    "PlayMark",
    "PlayMedia",
    "ProtocolError",
    "Start",
    "Stop",
    "clear_message",
    "mark_message",
    "media_message",
    "parse",
    "parse_outbound",
]


class ProtocolError(ValueError):
    """A frame that does not follow the Media Streams protocol."""

    def __init__(self, field_path: str, problem: str) -> None:
        super().__init__(f"{field_path}: {problem}")
        self.field = field_path
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Connected:
    protocol: str = "Call"
    version: str = "1.0.0"

    def to_json(self) -> str:
        return json.dumps(
            {"event": "connected", "protocol": self.protocol, "version": self.version}
        )


@dataclass(frozen=True, slots=True)
class Start:
    sequence_number: int
    stream_sid: str
    account_sid: str
    call_sid: str
    tracks: tuple[str, ...]
    custom_parameters: dict[str, str]
    encoding: str = "audio/x-mulaw"
    sample_rate: int = 8000
    channels: int = 1

    def to_json(self) -> str:
        return json.dumps(
            {
                "event": "start",
                "sequenceNumber": str(self.sequence_number),
                "streamSid": self.stream_sid,
                "start": {
                    "streamSid": self.stream_sid,
                    "accountSid": self.account_sid,
                    "callSid": self.call_sid,
                    "tracks": list(self.tracks),
                    "customParameters": self.custom_parameters,
                    "mediaFormat": {
                        "encoding": self.encoding,
                        "sampleRate": self.sample_rate,
                        "channels": self.channels,
                    },
                },
            }
        )


@dataclass(frozen=True, slots=True)
class Media:
    sequence_number: int
    stream_sid: str
    track: str
    chunk: int
    timestamp: int
    payload: bytes = field(repr=False)

    def to_json(self) -> str:
        return json.dumps(
            {
                "event": "media",
                "sequenceNumber": str(self.sequence_number),
                "streamSid": self.stream_sid,
                "media": {
                    "track": self.track,
                    "chunk": str(self.chunk),
                    "timestamp": str(self.timestamp),
                    "payload": base64.b64encode(self.payload).decode("ascii"),
                },
            }
        )


@dataclass(frozen=True, slots=True)
class Dtmf:
    sequence_number: int
    stream_sid: str
    track: str
    digit: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "event": "dtmf",
                "sequenceNumber": str(self.sequence_number),
                "streamSid": self.stream_sid,
                "dtmf": {"track": self.track, "digit": self.digit},
            }
        )


@dataclass(frozen=True, slots=True)
class Mark:
    sequence_number: int
    stream_sid: str
    name: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "event": "mark",
                "sequenceNumber": str(self.sequence_number),
                "streamSid": self.stream_sid,
                "mark": {"name": self.name},
            }
        )


@dataclass(frozen=True, slots=True)
class Stop:
    sequence_number: int
    stream_sid: str
    account_sid: str
    call_sid: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "event": "stop",
                "sequenceNumber": str(self.sequence_number),
                "streamSid": self.stream_sid,
                "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
            }
        )


InboundEvent = Connected | Start | Media | Dtmf | Mark | Stop


@dataclass(frozen=True, slots=True)
class PlayMedia:
    """Agent audio we send (raw 8 kHz mu-law)."""

    stream_sid: str
    payload: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class PlayMark:
    stream_sid: str
    name: str


@dataclass(frozen=True, slots=True)
class Clear:
    stream_sid: str


OutboundEvent = PlayMedia | PlayMark | Clear

DTMF_DIGITS = frozenset("0123456789*#ABCD")


def _obj(msg: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    value = msg.get(key)
    if not isinstance(value, dict):
        raise ProtocolError(f"{path}{key}", f"expected an object, got {_kind(value)}")
    return value


def _str(msg: dict[str, Any], key: str, path: str = "") -> str:
    value = msg.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"{path}{key}", f"expected a string, got {_kind(value)}")
    return value


def _counter(msg: dict[str, Any], key: str, path: str = "") -> int:
    """Twilio sends counters as decimal strings; accept plain integers too."""
    value = msg.get(key)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ProtocolError(f"{path}{key}", f"expected a decimal string, got {_kind(value)}")
    if isinstance(value, str) and not value.isdecimal():
        raise ProtocolError(f"{path}{key}", f"expected a decimal string, got {value!r:.40}")
    number = int(value)
    if number < 0:
        raise ProtocolError(f"{path}{key}", f"must not be negative, got {number}")
    return number


def _int(msg: dict[str, Any], key: str, path: str) -> int:
    value = msg.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{path}{key}", f"expected a number, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r:.40}"


def _stream_sid(msg: dict[str, Any]) -> str:
    sid = _str(msg, "streamSid")
    if not sid:
        raise ProtocolError("streamSid", "must not be empty")
    return sid


def _parse_start(msg: dict[str, Any]) -> Start:
    start = _obj(msg, "start", "")
    tracks = start.get("tracks", ["inbound"])
    if not isinstance(tracks, list) or not all(isinstance(t, str) for t in tracks):
        raise ProtocolError("start.tracks", f"expected a list of strings, got {_kind(tracks)}")
    params = start.get("customParameters", {})
    if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
        raise ProtocolError(
            "start.customParameters", f"expected an object of strings, got {_kind(params)}"
        )
    fmt = _obj(start, "mediaFormat", "start.")
    encoding = _str(fmt, "encoding", "start.mediaFormat.")
    if encoding != "audio/x-mulaw":
        raise ProtocolError(
            "start.mediaFormat.encoding", f"expected audio/x-mulaw, got {encoding!r}"
        )
    rate = _int(fmt, "sampleRate", "start.mediaFormat.")
    if rate != 8000:
        raise ProtocolError("start.mediaFormat.sampleRate", f"expected 8000, got {rate}")
    channels = _int(fmt, "channels", "start.mediaFormat.")
    if channels != 1:
        raise ProtocolError("start.mediaFormat.channels", f"expected 1, got {channels}")
    stream_sid = _stream_sid(msg)
    inner_sid = start.get("streamSid", stream_sid)
    if inner_sid != stream_sid:
        raise ProtocolError("start.streamSid", f"{inner_sid!r:.40} differs from streamSid")
    call_sid = _str(start, "callSid", "start.")
    if not call_sid:
        raise ProtocolError("start.callSid", "must not be empty")
    return Start(
        sequence_number=_counter(msg, "sequenceNumber"),
        stream_sid=stream_sid,
        account_sid=_str(start, "accountSid", "start."),
        call_sid=call_sid,
        tracks=tuple(tracks),
        custom_parameters=dict(params),
        encoding=encoding,
        sample_rate=rate,
        channels=channels,
    )


def _parse_media(msg: dict[str, Any]) -> Media:
    media = _obj(msg, "media", "")
    encoded = _str(media, "payload", "media.")
    try:
        payload = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("media.payload", f"not valid base64 ({exc})") from None
    return Media(
        sequence_number=_counter(msg, "sequenceNumber"),
        stream_sid=_stream_sid(msg),
        track=media.get("track", "inbound") if isinstance(media.get("track"), str) else "inbound",
        chunk=_counter(media, "chunk", "media.") if "chunk" in media else 0,
        timestamp=_counter(media, "timestamp", "media.") if "timestamp" in media else 0,
        payload=payload,
    )


def _parse_dtmf(msg: dict[str, Any]) -> Dtmf:
    dtmf = _obj(msg, "dtmf", "")
    digit = _str(dtmf, "digit", "dtmf.")
    if digit not in DTMF_DIGITS or len(digit) != 1:
        raise ProtocolError("dtmf.digit", f"expected one of 0-9 * # A-D, got {digit!r:.40}")
    return Dtmf(
        sequence_number=_counter(msg, "sequenceNumber"),
        stream_sid=_stream_sid(msg),
        track=dtmf.get("track", "inbound_track") if isinstance(dtmf.get("track"), str) else "",
        digit=digit,
    )


def _parse_mark(msg: dict[str, Any]) -> Mark:
    mark = _obj(msg, "mark", "")
    return Mark(
        sequence_number=_counter(msg, "sequenceNumber"),
        stream_sid=_stream_sid(msg),
        name=_str(mark, "name", "mark."),
    )


def _parse_stop(msg: dict[str, Any]) -> Stop:
    stop = msg.get("stop", {})
    if not isinstance(stop, dict):
        raise ProtocolError("stop", f"expected an object, got {_kind(stop)}")
    return Stop(
        sequence_number=_counter(msg, "sequenceNumber"),
        stream_sid=_stream_sid(msg),
        account_sid=stop.get("accountSid", "") if isinstance(stop.get("accountSid"), str) else "",
        call_sid=stop.get("callSid", "") if isinstance(stop.get("callSid"), str) else "",
    )


def _parse_connected(msg: dict[str, Any]) -> Connected:
    return Connected(protocol=_str(msg, "protocol"), version=_str(msg, "version"))


_PARSERS = {
    "connected": _parse_connected,
    "start": _parse_start,
    "media": _parse_media,
    "dtmf": _parse_dtmf,
    "mark": _parse_mark,
    "stop": _parse_stop,
}


def parse(frame: str | bytes) -> InboundEvent:
    """Decode one text frame from Twilio. Raises ProtocolError on anything malformed."""
    event, msg = _load(frame)
    parser = _PARSERS.get(event)
    if parser is None:
        raise ProtocolError("event", f"unknown event {event!r:.40}")
    return parser(msg)


def _parse_play_media(msg: dict[str, Any]) -> PlayMedia:
    media = _obj(msg, "media", "")
    try:
        payload = base64.b64decode(_str(media, "payload", "media."), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError("media.payload", f"not valid base64 ({exc})") from None
    return PlayMedia(stream_sid=_stream_sid(msg), payload=payload)


def _parse_play_mark(msg: dict[str, Any]) -> PlayMark:
    return PlayMark(stream_sid=_stream_sid(msg), name=_str(_obj(msg, "mark", ""), "name", "mark."))


_OUTBOUND_PARSERS = {
    "media": _parse_play_media,
    "mark": _parse_play_mark,
    "clear": lambda msg: Clear(stream_sid=_stream_sid(msg)),
}


def _load(frame: str | bytes) -> tuple[str, dict[str, Any]]:
    if isinstance(frame, bytes):
        raise ProtocolError("frame", "binary frames are not part of the protocol")
    try:
        msg = json.loads(frame)
    except json.JSONDecodeError as exc:
        raise ProtocolError("frame", f"invalid JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(msg, dict):
        raise ProtocolError("frame", f"expected a JSON object, got {_kind(msg)}")
    event = msg.get("event")
    if not isinstance(event, str):
        raise ProtocolError("event", f"expected a string, got {_kind(event)}")
    return event, msg


def parse_outbound(frame: str | bytes) -> OutboundEvent:
    """Decode one frame as Twilio reads what we send (used by the Twilio-side simulator)."""
    event, msg = _load(frame)
    parser = _OUTBOUND_PARSERS.get(event)
    if parser is None:
        raise ProtocolError("event", f"unknown event {event!r:.40}")
    return parser(msg)


def media_message(stream_sid: str, mulaw: bytes) -> str:
    """Audio for Twilio to append to its playback buffer (raw 8 kHz mu-law, any length)."""
    payload = base64.b64encode(mulaw).decode("ascii")
    sid = json.dumps(stream_sid)
    return f'{{"event":"media","streamSid":{sid},"media":{{"payload":"{payload}"}}}}'


def mark_message(stream_sid: str, name: str) -> str:
    """Asks Twilio to echo `name` back once everything queued before it has played."""
    return json.dumps({"event": "mark", "streamSid": stream_sid, "mark": {"name": name}})


def clear_message(stream_sid: str) -> str:
    """Empties Twilio's playback buffer; Twilio then echoes every pending mark."""
    return json.dumps({"event": "clear", "streamSid": stream_sid})
