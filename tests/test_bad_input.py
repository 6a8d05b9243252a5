"""Malformed and hostile input through the real server: each gets a defined answer and a log
line, and a good call running at the same time does not notice."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import telephony.server.app
from telephony.call import CallInfo, Outcome
from telephony.testing.simulator import place_call
from telephony.twilio.media_stream import Media, Start, Stop

from .audio_tools import best_correlation, fixture, pcm
from .server import RunningServer, running_server, wait_until


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("bad")) as running:
        yield running


def _ws(server: RunningServer) -> str:
    return server.base_url.replace("http", "ws") + "/stream"


def _start(sid: str) -> str:
    return Start(1, "MZ" + sid[2:], "AC1", sid, ("inbound",), {}).to_json()


def _media(sid: str, payload: bytes, seq: int = 2) -> str:
    return Media(seq, "MZ" + sid[2:], "inbound", seq, seq * 20, payload).to_json()


async def _closed_by_server(ws: ClientConnection, within: float = 5.0) -> bool:
    try:
        async with asyncio.timeout(within):
            async for _ in ws:
                pass
    except ConnectionClosed:
        return True
    except TimeoutError:
        return False
    return True


async def test_junk_on_the_stream_is_ignored_and_logged_while_a_good_call_goes_on(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="telephony")
    sid = "CA" + "b" * 32
    async with place_call(server.base_url, call_sid="CA" + "a" * 32) as good:
        async with connect(_ws(server), max_size=2**20) as ws:
            await ws.send("{not json")
            await ws.send(json.dumps({"event": "party"}))
            await ws.send(_media(sid, b"\xff" * 160))  # media before start
            await ws.send(b"\x00\x01binary")
            await ws.send("x" * 100_000)
            await ws.send(_start(sid))
            await ws.send(_start(sid))  # start twice
            await ws.send(_media("CA" + "c" * 32, b"\xff" * 160))  # another stream's SID
            garbage = json.loads(_media(sid, b"\xff" * 160))
            garbage["media"]["payload"] = "***not base64***"
            await ws.send(json.dumps(garbage))
            await ws.send(_media(sid, b"\xff" * 161, seq=3))  # odd size: fine
            await ws.send(Stop(4, "MZ" + sid[2:], "AC1", sid).to_json())
            assert await _closed_by_server(ws)  # the stop ended the call and the stream
        await good.say(fixture("hello"))
        await good.finish_speaking()
        await asyncio.sleep(len(fixture("hello")) / 8000 + 1.0)  # the whole echo
        score, _ = best_correlation(good.log.heard_pcm(), pcm(fixture("hello"))[2400:-4000])
        assert score > 0.9
        await good.hang_up()
    for expected in (
        "ignored malformed message: frame: invalid JSON",
        "ignored malformed message: event: unknown event 'party'",
        "ignored media before start",
        "binary frames are not part of the protocol",
        "dropped a 100000-byte frame",
        "ignored a second start on the same socket",
        "ignored a message for stream MZcccc",
        "media.payload",
        f"call {sid}: ended: caller hung up (stop)",
    ):
        assert expected in caplog.text, expected
    assert server.calls.get(sid) is None


async def test_a_socket_that_never_starts_is_closed(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(telephony.server.app, "START_TIMEOUT_S", 0.5)
    async with connect(_ws(server)) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        assert await _closed_by_server(ws, within=3)
    assert "no start within 0 s; closing it" in caplog.text


async def test_a_flood_of_junk_closes_the_socket(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with connect(_ws(server)) as ws:
        for _ in range(telephony.server.app.MAX_BAD_MESSAGES):
            await ws.send("junk")
        assert await _closed_by_server(ws)
    assert (
        f"closing the stream after {telephony.server.app.MAX_BAD_MESSAGES} bad messages"
        in caplog.text
    )


async def test_media_after_stop_goes_nowhere(server: RunningServer) -> None:
    sid = "CA" + "d" * 32
    async with connect(_ws(server)) as ws:
        await ws.send(_start(sid))
        await ws.send(Stop(2, "MZ" + sid[2:], "AC1", sid).to_json())
        with pytest.raises(ConnectionClosed):
            for seq in range(3, 200):
                await ws.send(_media(sid, b"\xff" * 160, seq))
                await asyncio.sleep(0.01)
    # the socket closes first; the call's end is then written to its history
    await wait_until(lambda: server.calls.get(sid) is None, 2, "the call to be forgotten")


async def test_a_second_stream_for_the_same_call_replaces_the_first(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    sid = "CA" + "e" * 32
    async with connect(_ws(server)) as first, connect(_ws(server)) as second:
        await first.send(_start(sid))
        await asyncio.sleep(0.3)
        await second.send(_start(sid))
        assert await _closed_by_server(first)
        await second.send(base64.b64encode(b"x").decode())  # junk on the live one: ignored
        await second.send(Stop(2, "MZ" + sid[2:], "AC1", sid).to_json())
        assert await _closed_by_server(second)
    assert "a second media stream replaces the first" in caplog.text


def _post(server: RunningServer, body: bytes, path: str = "/voice") -> int:
    request = urllib.request.Request(
        server.base_url + path,
        data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_oversized_and_malformed_webhooks_are_refused(server: RunningServer) -> None:
    assert _post(server, b"CallSid=CA1&From=" + b"9" * 100_000) == 413
    assert _post(server, b"From=%2B1555") == 400  # no CallSid
    assert _post(server, b"\xff\xfe\x00garbage") == 400
    assert _post(server, b"CallSid=CA1", path="/nowhere") == 404


async def test_a_socket_closed_right_after_start_leaves_no_call_behind(
    server: RunningServer,
) -> None:
    """The stream goes away while its start is being handled: the call must still end (on
    Python 3.11 a wait_for around the read could swallow the cancellation and orphan it)."""
    sids = [f"CA{n:032x}" for n in range(0xF000, 0xF000 + 10)]
    for sid in sids:
        async with place_call(server.base_url, call_sid=sid) as sim:
            await sim.close()  # as soon as the start is out
    for _ in range(100):
        if all(server.calls.get(sid) is None for sid in sids):
            break
        await asyncio.sleep(0.05)
    assert [sid for sid in sids if server.calls.get(sid) is not None] == []


async def test_a_failed_write_to_twilio_ends_the_call_without_raising() -> None:
    """The model's event pump sends through this: an error escaping it would be taken for the
    live session failing (and the model restarted) when it is the caller's leg that broke."""

    class Ended:
        info = CallInfo("CA" + "9" * 32, "", "")
        reason = ""
        outcome: Outcome | None = None

        def end(self, reason: str, outcome: Outcome) -> None:
            self.reason, self.outcome = reason, outcome

    async def broken(text: str) -> None:
        raise ConnectionResetError("peer gone")

    call = Ended()
    send = telephony.server.app._sender(call, broken)  # type: ignore[arg-type]
    await send("{}")
    await send("{}")  # a dead socket is not written to again
    assert call.reason == "Twilio socket failed"
    assert call.outcome == Outcome.STREAM_ERROR


async def test_a_stream_for_a_call_that_ended_here_is_closed_not_restarted(
    server: RunningServer,
) -> None:
    """A call over (e.g. it ended while Twilio pressed keys for it) must not start afresh,
    with a new live session and a second greeting, when a stream for it arrives."""
    sid = "CA" + "9" * 32
    async with connect(_ws(server)) as ws:
        await ws.send(_start(sid))
        await ws.send(Stop(2, "MZ" + sid[2:], "AC1", sid).to_json())
        assert await _closed_by_server(ws)
    await wait_until(lambda: server.calls.get(sid) is None, 5, "the call to be over")
    async with connect(_ws(server)) as ws:
        await ws.send(_start(sid))
        assert await _closed_by_server(ws)
    assert server.calls.get(sid) is None
