"""The server's settings file (`--server-config`): what it may set, the clear error for what it
may not, the shipped file, and the pings a media stream gets (none of which closes it)."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from quart import Quart, websocket
from websockets.asyncio.client import connect

from telephony.cli import main
from telephony.server.serving import (
    DEFAULTS,
    QUEUE_HIGH,
    MediaStreamProtocol,
    ServerConfigError,
    read_server_config,
    server_config,
)

from .server import serving

REPO = Path(__file__).resolve().parent.parent


def _file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return str(path)


def test_the_shipped_file_pings_without_closing_for_a_missing_pong() -> None:
    options = read_server_config(str(REPO / "config/server.toml"))
    config = server_config(Quart(__name__), "127.0.0.1", 8080, options)
    assert (config.ws, config.http, config.lifespan, config.log_config) == (
        MediaStreamProtocol,
        "h11",
        "on",
        None,
    )
    assert (config.ws_ping_interval, config.ws_ping_timeout) == (20, None)
    assert (config.access_log, config.timeout_keep_alive, config.timeout_graceful_shutdown) == (
        True,
        75,
        5,
    )
    assert not config.ws_per_message_deflate and not config.proxy_headers


def test_a_file_overrides_only_what_it_sets(tmp_path: Path) -> None:
    options = read_server_config(_file(tmp_path, "ws_ping_timeout = 30\nws_ping_interval = 0\n"))
    assert options == {**DEFAULTS, "ws_ping_timeout": 30, "ws_ping_interval": 0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("workers = 2\n", "unknown setting 'workers' (known: access_log, timeout_keep_alive"),
        ("keep_alive_timeout = 75\n", "unknown setting 'keep_alive_timeout'"),
        ('access_log = "-"\n', "access_log must be true or false, not '-'"),
        ("timeout_keep_alive = 0\n", "timeout_keep_alive must be whole seconds, 1 or more"),
        ("timeout_keep_alive = 7.5\n", "timeout_keep_alive must be whole seconds"),
        ("ws_ping_interval = -1\n", "ws_ping_interval must be seconds, 0 or more"),
        ("ws_ping_timeout = 0\n", "ws_ping_timeout must be seconds, more than 0"),
        ("ws_ping_timeout = true\n", "ws_ping_timeout must be seconds"),
        ("ws_ping_interval = nan\n", "ws_ping_interval must be seconds"),
        ("timeout_graceful_shutdown = -1\n", "timeout_graceful_shutdown must be whole seconds"),
        ("access_log = yes\n", "is not TOML"),
    ],
)
def test_a_bad_setting_is_refused_by_name(tmp_path: Path, text: str, message: str) -> None:
    path = _file(tmp_path, text)
    with pytest.raises(ServerConfigError) as refused:
        read_server_config(path)
    assert str(refused.value).startswith(path) and message in str(refused.value)


def test_serve_stops_at_start_up_on_a_bad_file_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _file(tmp_path, "websocket_ping_interval = 20\n")
    assert main(["serve", "echo", "--session-uri", "", "--server-config", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"telephony: {path}: unknown setting 'websocket_ping_interval'")
    assert err.count("\n") == 1
    missing = str(tmp_path / "nowhere.toml")
    assert main(["serve", "echo", "--session-uri", "", "--server-config", missing]) == 2
    assert capsys.readouterr().err.startswith(f"telephony: cannot read {missing}: ")


def test_the_old_hypercorn_option_names_the_new_one() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "telephony.cli", "serve", "echo", "--hypercorn-config", "x.toml"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert done.returncode == 2
    assert "--hypercorn-config is gone" in done.stderr and "--server-config" in done.stderr


async def test_a_stream_is_pinged_and_not_closed_for_the_missing_pongs() -> None:
    """Twilio may not answer pings: a peer that never does keeps its stream."""
    app = Quart(__name__)
    received: list[str] = []

    @app.websocket("/stream")
    async def stream() -> None:
        await websocket.accept()
        received.append(await websocket.receive())

    options = {**DEFAULTS, "ws_ping_interval": 0.1}
    async with serving(app, options) as url:
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        pings = 0
        async with asyncio.timeout(3):
            while pings < 5:  # half a second of pings, none answered
                opcode, length = await reader.readexactly(2)
                await reader.readexactly(length)
                assert opcode == 0x89, f"a frame other than a ping: {opcode:#x}"
                pings += 1
        mask = os.urandom(4)
        text = b"still here"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(text))
        writer.write(struct.pack("!BB", 0x81, 0x80 | len(text)) + mask + masked)
        await writer.drain()
        async with asyncio.timeout(3):
            while not received:
                await asyncio.sleep(0.01)
        writer.close()
    assert received == ["still here"]


@pytest.mark.parametrize("sender", ["paced", "a burst"])
async def test_a_stream_is_read_without_pausing_its_socket_per_message(
    sender: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn stops reading a WebSocket's socket after each message until the app takes it
    (two epoll changes per Twilio frame); ours only once QUEUE_HIGH messages wait unread (a
    burst read at once), and reads on once the app has taken them. Every message arrives, in
    order."""
    pauses: list[object] = []
    pause = asyncio.selector_events._SelectorTransport.pause_reading  # type: ignore[attr-defined]

    def counted(transport: object) -> None:
        pauses.append(transport)
        pause(transport)

    monkeypatch.setattr(asyncio.selector_events._SelectorTransport, "pause_reading", counted)  # type: ignore[attr-defined]
    app = Quart(__name__)
    received: list[str] = []
    behind = asyncio.Event()
    count = 3 * QUEUE_HIGH

    @app.websocket("/stream")
    async def stream() -> None:
        await websocket.accept()
        if sender == "a burst":
            await behind.wait()
        while len(received) < count:
            received.append(await websocket.receive())
        await websocket.send("done")

    async with serving(app) as url, connect(url.replace("http", "ws") + "/stream") as ws:
        for n in range(count):
            await ws.send(f"message {n}")
            if sender == "paced":
                await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)
        behind.set()
        assert await asyncio.wait_for(ws.recv(), 5) == "done"
    assert received == [f"message {n}" for n in range(count)]
    assert len(pauses) == (0 if sender == "paced" else 1)
