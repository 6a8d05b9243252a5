"""A real telephony server (uvicorn on a loopback port, as `telephony serve` runs it) in a
background thread, and the helpers end-to-end tests use to drive calls through it."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from quart import Quart

from telephony.call import CALL_TASKS
from telephony.server.app import create_app
from telephony.server.registry import CallRegistry
from telephony.server.serving import DEFAULTS, Server, server_config
from telephony.settings import Settings
from telephony.testing.simulator import CallerSimulator

from .audio_tools import fixture


@dataclass
class RunningServer:
    base_url: str
    settings: Settings
    app: Quart
    loop: asyncio.AbstractEventLoop

    @property
    def calls(self) -> CallRegistry:
        return self.app.extensions["telephony.calls"]

    def call_tasks(self) -> list[str]:
        """Names of the per-call tasks still alive in the server's loop."""
        future = asyncio.run_coroutine_threadsafe(_task_names(), self.loop)
        return [n for n in future.result(5) if n.split("-")[0] in CALL_TASKS]


async def _task_names() -> list[str]:
    return [t.get_name() for t in asyncio.all_tasks()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(tmp: Path, **overrides: object) -> Iterator[RunningServer]:
    port = free_port()
    values: dict[str, object] = {"agent": "echo", "session_uri": f"sqlite:///{tmp}/sessions.db"}
    values.update(overrides)
    settings = Settings(host="127.0.0.1", port=port, **values)  # type: ignore[arg-type]
    app = create_app(settings)
    server = Server(server_config(app, "127.0.0.1", port, DEFAULTS))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    for _ in range(500):
        if server.started or not thread.is_alive():
            break
        threading.Event().wait(0.02)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", settings, app, loop)
    finally:
        server.should_exit = True
        thread.join(15)


@asynccontextmanager
async def serving(app: Quart, options: dict[str, Any] = DEFAULTS) -> AsyncIterator[str]:
    """`app` served on a free loopback port by this loop, as the product's own server is;
    yields its URL."""
    port = free_port()
    server = Server(server_config(app, "127.0.0.1", port, options))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise AssertionError(f"the server on port {port} did not start")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextmanager
def echo_process(
    tmp: Path,
    *,
    env: dict[str, str] | None = None,
    capture: bool = False,
    agent: str = "echo",
    session_uri: str = "",
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`telephony serve echo` (or `agent`, empty: the built-in one) in a process of its own,
    as a user runs it; yields the process (its output in `stdout` with `capture`) and its URL
    once it answers /healthz. Sessions go to `session_uri`, by default an SQLite file in
    `tmp`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "telephony.cli", "serve", *([agent] if agent else [])]
        + ["--port", str(port), "--session-uri", session_uri or f"sqlite:///{tmp}/sessions.db"],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if capture else subprocess.DEVNULL,
        text=True,
    )
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""A scrape's samples by name and labels."""


def parse_metrics(text: str) -> Samples:
    """A Prometheus exposition, read by prometheus-client's own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(base_url: str) -> Samples:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as response:
        return parse_metrics(response.read().decode())


def sample(samples: Samples, name: str, *, before: bool = False, **labels: str) -> float:
    """One sample's value. `before`: a labelled counter not counted yet reads 0 (else a
    missing sample, a misspelt name, fails the test)."""
    key = (name, frozenset(labels.items()))
    return samples.get(key, 0.0) if before else samples[key]


def rise(start: Samples, end: Samples, name: str, **labels: str) -> float:
    """How much a sample grew from one scrape to a later one (where it must be)."""
    return sample(end, name, **labels) - sample(start, name, before=True, **labels)


def calls_ended(start: Samples, end: Samples, outcome: str, direction: str = "inbound") -> float:
    """Calls that ended with `outcome` between two scrapes."""
    return rise(start, end, "telephony_calls_total", direction=direction, outcome=outcome)


async def scrape_idle(server: RunningServer) -> Samples:
    """A scrape once no call is in progress: each call that ended is counted by then."""
    await wait_until(lambda: not len(server.calls), 5, "the calls to end")
    return await asyncio.to_thread(scrape, server.base_url)


async def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


async def say(sim: CallerSimulator, name: str) -> tuple[float, float]:
    """Speaks a whole fixture; returns when its first and last frames were sent."""
    speech = fixture(name)
    start = await sim.say(speech)
    await sim.finish_speaking()
    return start, start + len(speech) / 8000
