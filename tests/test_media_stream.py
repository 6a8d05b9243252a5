from __future__ import annotations

import base64
import json

import pytest

from telephony.twilio.media_stream import (
    Clear,
    Connected,
    Dtmf,
    Mark,
    Media,
    PlayMark,
    PlayMedia,
    ProtocolError,
    Start,
    Stop,
    clear_message,
    mark_message,
    media_message,
    parse,
    parse_outbound,
)

START = {
    "event": "start",
    "sequenceNumber": "1",
    "streamSid": "MZ1",
    "start": {
        "streamSid": "MZ1",
        "accountSid": "AC1",
        "callSid": "CA1",
        "tracks": ["inbound"],
        "customParameters": {"caller": "+15551234567"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    },
}


def test_parses_every_twilio_message() -> None:
    assert parse('{"event":"connected","protocol":"Call","version":"1.0.0"}') == Connected()
    start = parse(json.dumps(START))
    assert isinstance(start, Start)
    assert (start.call_sid, start.stream_sid, start.sequence_number) == ("CA1", "MZ1", 1)
    assert start.custom_parameters == {"caller": "+15551234567"}
    payload = base64.b64encode(b"\xff" * 160).decode()
    media = parse(
        json.dumps(
            {
                "event": "media",
                "sequenceNumber": "3",
                "streamSid": "MZ1",
                "media": {"track": "inbound", "chunk": "2", "timestamp": "40", "payload": payload},
            }
        )
    )
    assert media == Media(3, "MZ1", "inbound", 2, 40, b"\xff" * 160)
    dtmf = parse(
        '{"event":"dtmf","sequenceNumber":"4","streamSid":"MZ1",'
        '"dtmf":{"track":"inbound_track","digit":"#"}}'
    )
    assert dtmf == Dtmf(4, "MZ1", "inbound_track", "#")
    mark = parse('{"event":"mark","sequenceNumber":"5","streamSid":"MZ1","mark":{"name":"7"}}')
    assert mark == Mark(5, "MZ1", "7")
    stop = parse(
        '{"event":"stop","sequenceNumber":"6","streamSid":"MZ1",'
        '"stop":{"accountSid":"AC1","callSid":"CA1"}}'
    )
    assert stop == Stop(6, "MZ1", "AC1", "CA1")


@pytest.mark.parametrize(
    "event",
    [
        Connected(),
        Start(1, "MZ1", "AC1", "CA1", ("inbound",), {"a": "b"}),
        Media(2, "MZ1", "inbound", 1, 20, b"\x00\x01\xff"),
        Dtmf(3, "MZ1", "inbound_track", "5"),
        Mark(4, "MZ1", "x"),
        Stop(5, "MZ1", "AC1", "CA1"),
    ],
)
def test_round_trips(event: object) -> None:
    assert parse(event.to_json()) == event  # type: ignore[attr-defined]


def test_builds_and_reads_back_what_we_send() -> None:
    assert parse_outbound(media_message("MZ1", b"\x01\x02")) == PlayMedia("MZ1", b"\x01\x02")
    assert parse_outbound(mark_message("MZ1", "n")) == PlayMark("MZ1", "n")
    assert parse_outbound(clear_message("MZ1")) == Clear("MZ1")
    assert json.loads(media_message('M"Z', b"")) == {
        "event": "media",
        "streamSid": 'M"Z',
        "media": {"payload": ""},
    }


def _with(path: str, value: object) -> str:
    msg = json.loads(json.dumps(START))
    *parents, last = path.split(".")
    node = msg
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return json.dumps(msg)


@pytest.mark.parametrize(
    ("frame", "field", "problem"),
    [
        (b"\x00binary", "frame", "binary"),
        ("{not json", "frame", "invalid JSON"),
        ("[1, 2]", "frame", "JSON object"),
        ('{"event": "bogus"}', "event", "unknown event"),
        ('{"event": 3}', "event", "expected a string"),
        (_with("streamSid", KeyError), "streamSid", "expected a string"),
        (_with("streamSid", ""), "streamSid", "empty"),
        (_with("sequenceNumber", "x1"), "sequenceNumber", "decimal"),
        (_with("sequenceNumber", True), "sequenceNumber", "decimal"),
        (_with("start.callSid", KeyError), "start.callSid", "expected a string"),
        (_with("start.mediaFormat.encoding", "audio/l16"), "start.mediaFormat.encoding", "mulaw"),
        (_with("start.mediaFormat.sampleRate", 16000), "start.mediaFormat.sampleRate", "8000"),
        (_with("start.mediaFormat.channels", 2), "start.mediaFormat.channels", "1"),
        (_with("start.customParameters", {"a": 1}), "start.customParameters", "strings"),
        (_with("start.tracks", "inbound"), "start.tracks", "list"),
        (_with("start.streamSid", "MZ2"), "start.streamSid", "differs"),
        (_with("start", KeyError), "start", "expected an object"),
        (
            '{"event":"media","sequenceNumber":"1","streamSid":"MZ1","media":{"payload":"@@"}}',
            "media.payload",
            "base64",
        ),
        (
            '{"event":"dtmf","sequenceNumber":"1","streamSid":"MZ1","dtmf":{"digit":"55"}}',
            "dtmf.digit",
            "one of",
        ),
        (
            '{"event":"mark","sequenceNumber":"1","streamSid":"MZ1","mark":{}}',
            "mark.name",
            "string",
        ),
    ],
)
def test_rejects_malformed_input_naming_the_field(frame: str, field: str, problem: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse(frame)
    assert caught.value.field == field
    assert problem in caught.value.problem
    assert str(caught.value).startswith(f"{field}: ")


def test_outbound_parser_rejects_unknown_events() -> None:
    with pytest.raises(ProtocolError, match="unknown event 'start'"):
        parse_outbound(json.dumps(START))
