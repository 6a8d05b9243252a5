"""The HTTP server the app runs under: uvicorn with the sans-I/O `websockets` protocol. Twilio
sends 50 media messages a second per call, and hypercorn's pure-Python frame parsing and
queues took a fifth of the server's CPU; under this a call costs 10-19% less (10 concurrent
real-path calls, paired runs). Its settings come from a small TOML file (`config/server.toml`),
checked before anything starts."""

from __future__ import annotations

import contextlib
import math
import tomllib
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

__all__ = [
    "DEFAULTS",
    "QUEUE_HIGH",
    "MediaStreamProtocol",
    "Server",
    "ServerConfigError",
    "read_server_config",
    "server_config",
]

QUEUE_HIGH = 16
"""Messages one read of the socket may leave unread before the socket stops being read (a
third of a second of a Twilio stream). Under Quart this is no bound on a slow reader: Quart
takes every message off this queue into its own at once, as it did from uvicorn's own."""


class MediaStreamProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol stops reading the socket after every message and starts
    again when the app takes it: two epoll changes per Twilio frame, 5% of a call's CPU. This
    one stops only once QUEUE_HIGH messages wait unread (and not once it has sent its close:
    uvicorn reads on for the peer's reply); uvicorn's own code starts it again once the app
    has read them all. (uvicorn's internals: tests/test_serving.py holds it to them.)"""

    def send_receive_event_to_app(self) -> None:
        paused = self.read_paused
        self.read_paused = True  # uvicorn's code then leaves the socket be
        try:
            super().send_receive_event_to_app()
        finally:
            self.read_paused = paused
        if not paused and not self.close_sent and self.queue.qsize() >= QUEUE_HIGH:
            self.read_paused = True
            self.transport.pause_reading()


class ServerConfigError(ValueError):
    """A settings file that cannot work: the message names the file and the setting."""


def _seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "access_log": (lambda v: isinstance(v, bool), "true or false"),
    "timeout_keep_alive": (lambda v: _whole(v) and v >= 1, "whole seconds, 1 or more"),
    "ws_ping_interval": (lambda v: _seconds(v) and v >= 0, "seconds, 0 or more (0: no pings)"),
    "ws_ping_timeout": (
        lambda v: _seconds(v) and v > 0,
        "seconds, more than 0 (leave it out to never close for a missing pong)",
    ),
    "timeout_graceful_shutdown": (lambda v: _whole(v) and v >= 0, "whole seconds, 0 or more"),
}
"""The uvicorn settings a file may set, each with its check and what the check wants."""

DEFAULTS: dict[str, Any] = {
    "access_log": False,
    "timeout_keep_alive": 75,
    "ws_ping_interval": 20.0,
    "ws_ping_timeout": None,
    "timeout_graceful_shutdown": 5,
}
"""Without a file: no access log; keep-alive past a load balancer's usual 60 s idle timeout;
a ping every 20 s that keeps the stream's path open, with no close for a missing pong
(Twilio does not promise to answer pings, and a dropped call is worse than a dead socket
kept a little longer); after the drain, 5 s for sockets to close."""


def read_server_config(path: str) -> dict[str, Any]:
    """The settings in `path` over `DEFAULTS`; a `ServerConfigError` for a file that is not
    there, is not TOML, or has a setting we do not take or a value that cannot work."""
    try:
        with open(path, "rb") as file:
            given = tomllib.load(file)
    except OSError as exc:
        raise ServerConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ServerConfigError(f"{path} is not TOML: {exc}") from exc
    for name, value in given.items():
        if name not in _CHECKS:
            raise ServerConfigError(
                f"{path}: unknown setting {name!r} (known: {', '.join(_CHECKS)})"
            )
        check, wanted = _CHECKS[name]
        if not check(value):
            raise ServerConfigError(f"{path}: {name} must be {wanted}, not {value!r}")
    return {**DEFAULTS, **given}


def server_config(app: Any, host: str, port: int, options: dict[str, Any]) -> uvicorn.Config:
    """uvicorn's configuration for `app` on `host:port`. Log lines go through the root
    logger's handlers (JSON too), and the request's own scheme and host are the ones Twilio's
    signatures are checked against: no proxy header rewrites them."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http="h11",
        ws=MediaStreamProtocol,
        ws_per_message_deflate=False,
        lifespan="on",
        log_config=None,
        proxy_headers=False,
        **options,
    )


class Server(uvicorn.Server):
    """uvicorn without signal handling of its own: it would stop at the first SIGTERM,
    closing every call's stream (1012), and raise the signal again once stopped. Whoever
    runs it drains the calls first, then sets `should_exit`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
