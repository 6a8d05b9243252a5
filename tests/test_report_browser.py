"""The call report page in a real browser (Debian's headless `chromium`, no network), driven
over the DevTools protocol: both lanes render, every marker sits where the recording's time
puts it on the shared axis, the transcript is there, playing moves the playhead and a click
seeks; no console errors, no request leaves the page. A screenshot is kept as an artifact
(in TELEPHONY_TEST_ARTIFACTS when set, else in the test's tmp directory).

Without chromium the test is skipped, unless TELEPHONY_REQUIRE_CHROMIUM is set (CI): then it
fails."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import itertools
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect

from telephony.call.recording import load_recording
from telephony.server.report import build_report, render
from telephony.testing.replay import replay_in_process

CALLS = Path(__file__).parent / "calls"
WIDTH, HEIGHT = 1400, 1000
PIXEL = 1.5
"""How far a marker may sit from where its time puts it (sub-pixel rounding of both)."""
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--autoplay-policy=no-user-gesture-required",
    # Nothing could reach a network even if the page asked: no names resolve, no proxy answers.
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--proxy-server=http://127.0.0.1:9",
]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("TELEPHONY_REQUIRE_CHROMIUM"):
        pytest.fail("chromium is required here (TELEPHONY_REQUIRE_CHROMIUM) but not installed")
    pytest.skip("chromium is not installed (apt-get install chromium)")


class DevTools:
    """A minimal DevTools protocol client: commands by id, events kept for inspection."""

    def __init__(self, socket: ClientConnection) -> None:
        self._socket = socket
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for text in self._socket:
            message = json.loads(text)
            if "id" in message:
                future = self._waiting.pop(message["id"])
                if "error" in message:
                    future.set_exception(RuntimeError(f"DevTools: {message['error']}"))
                else:
                    future.set_result(message.get("result", {}))
            else:
                self.events.append(message)
                self._arrived.set()

    async def send(self, method: str, session: str = "", **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        message: dict[str, Any] = {"id": number, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        await self._socket.send(json.dumps(message))
        async with asyncio.timeout(30):
            return await future

    async def event(self, method: str) -> dict[str, Any]:
        async with asyncio.timeout(30):
            while True:
                for event in self.events:
                    if event["method"] == method:
                        return event
                self._arrived.clear()
                await self._arrived.wait()

    async def evaluate(self, session: str, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate",
            session,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def click(self, session: str, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                session,
                type=kind,
                x=x,
                y=y,
                button="left",
                clickCount=1,
            )

    def close(self) -> None:
        self._reader.cancel()


@contextlib.asynccontextmanager
async def browser(profile: Path) -> AsyncIterator[DevTools]:
    process = await asyncio.create_subprocess_exec(
        _chromium(),
        *FLAGS,
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        async with asyncio.timeout(60):  # chromium writes it once it listens
            while not (port_file.exists() and len(port_file.read_text().split()) == 2):
                await asyncio.sleep(0.05)
        port, path = port_file.read_text().split()
        async with connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as socket:
            tools = DevTools(socket)
            try:
                yield tools
            finally:
                tools.close()
    finally:
        process.kill()
        await process.wait()


def _expected_markers(entries: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(kind, seconds from the stream's start) of the markers the page must show, read from
    the recording's lines without the report's code."""
    origin = next(e["t"] for e in entries if e["kind"] == "in" and e["msg"]["event"] == "start")
    found: list[tuple[str, float]] = []
    for e in entries:
        event = e["msg"]["event"] if e["kind"] in ("in", "out") else e.get("event")
        kind = {
            ("in", "start"): "start",
            ("in", "stop"): "stop",
            ("in", "dtmf"): "dtmf",
            ("in", "mark"): "played",
            ("out", "mark"): "mark",
            ("out", "clear"): "clear",
            ("model", "interrupted"): "interrupted",
            ("model", "tool_call"): "tool_call",
            ("call", "barge_in"): "barge_in",
            ("call", "hold"): "hold",
            ("end", None): "end",
        }.get((e["kind"], event))
        if kind:
            found.append((kind, max(0.0, e["t"] - origin)))
    return found


def _finished_lines(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [
        ("caller" if e["event"] == "input_transcription" else "agent", e["text"].strip())
        for e in entries
        if e["kind"] == "model"
        and e["event"].endswith("_transcription")
        and e.get("finished")
        and e["text"].strip()
    ]


GEOMETRY = """(() => {
  const box = (el) => { const r = el.getBoundingClientRect();
    return {left: r.left, top: r.top, width: r.width, height: r.height}; };
  const plots = Array.from(document.querySelectorAll('#timeline .lane .plot')).map(box);
  const lanes = ['caller', 'agent'].map((name) => {
    const path = document.querySelector('#lane-' + name + ' path');
    return {name, d: path.getAttribute('d').length, box: box(path)};
  });
  const markers = Array.from(document.querySelectorAll('#timeline .marker')).map((m) =>
    ({kind: m.dataset.kind, t: parseFloat(m.dataset.t), x: m.getBoundingClientRect().left}));
  const rows = Array.from(document.querySelectorAll('#transcript tr.line')).map((r) =>
    [r.classList.contains('caller') ? 'caller' : 'agent', r.cells[2].textContent.trim()]);
  const play = box(document.getElementById('play-both'));
  return {plots, lanes, markers, rows, play, duration: window.callReport.duration};
})()"""

PLAYHEAD = """(() => {
  const plot = document.querySelector('#lane-caller .plot').getBoundingClientRect();
  return {position: window.callReport.position(), x: document.getElementById('playhead')
    .getBoundingClientRect().left, left: plot.left, width: plot.width, top: plot.top,
    height: plot.height};
})()"""


LANE = """((name, at, n) => {
  const lane = window.callReport.lane(name);
  return {length: lane.length, nonzero: lane.filter((x) => x !== 0).length,
    slice: Array.from(lane.subarray(at, at + n), (x) => Math.round(x * 32768))};
})"""


async def _check_page(
    page: Path, entries: list[dict[str, Any]], lanes: dict[str, np.ndarray], shot: Path
) -> None:
    async with browser(page.parent / "profile") as tools:
        target = await tools.send("Target.createTarget", url="about:blank")
        attached = await tools.send(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        session = attached["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            await tools.send(f"{domain}.enable", session)
        await tools.send(
            "Emulation.setDeviceMetricsOverride",
            session,
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )
        await tools.send("Page.navigate", session, url=page.as_uri())
        await tools.event("Page.loadEventFired")
        found = await tools.evaluate(session, GEOMETRY)

        # one time axis: every track's plot spans the same pixels
        first = found["plots"][0]
        assert first["width"] > 1000
        for plot in found["plots"]:
            assert (plot["left"], plot["width"]) == (first["left"], first["width"])
        for lane in found["lanes"]:  # a drawn waveform across the whole lane, with some height
            assert lane["d"] > 1000, lane["name"]
            assert lane["box"]["width"] == pytest.approx(first["width"], abs=PIXEL)
            assert lane["box"]["height"] > 10, lane["name"]

        duration = found["duration"]
        assert duration >= max(t for _, t in _expected_markers(entries))
        shown = found["markers"]
        for kind, t in _expected_markers(entries):
            x = first["left"] + t / duration * first["width"]
            near = [m for m in shown if m["kind"] == kind and abs(m["t"] - t) < 1e-3]
            assert near, f"no {kind} marker at {t:.3f} s"
            assert any(abs(m["x"] - x) <= PIXEL for m in near), (kind, t, x, near)
        for name, samples in lanes.items():  # the page decodes the audio it plays exactly
            at = int(np.argmax(np.abs(samples))) // 2
            decoded = await tools.evaluate(session, f"{LANE}('{name}', {at}, 2000)")
            assert decoded["length"] == len(samples)
            assert decoded["nonzero"] == np.count_nonzero(samples)
            assert decoded["slice"] == samples[at : at + 2000].tolist()
        assert sorted(found["rows"]) == sorted(list(line) for line in _finished_lines(entries))

        # playing moves the playhead; a click on a lane seeks there
        play = found["play"]
        await tools.click(
            session, play["left"] + play["width"] / 2, play["top"] + play["height"] / 2
        )
        async with asyncio.timeout(10):
            while (await tools.evaluate(session, PLAYHEAD))["position"] < 0.3:
                await asyncio.sleep(0.05)
        where = await tools.evaluate(session, PLAYHEAD)
        await tools.click(session, where["left"] + where["width"] / 2, where["top"] + 5)
        await tools.evaluate(session, "new Promise((r) => requestAnimationFrame(() => r(0)))")
        where = await tools.evaluate(session, PLAYHEAD)
        assert duration / 2 - 0.05 <= where["position"] <= duration / 2 + 1.0
        x = where["left"] + where["position"] / duration * where["width"]
        assert abs(where["x"] - x) <= 0.5 / duration * where["width"] + PIXEL
        await tools.evaluate(session, "window.callReport.pause()")

        image = await tools.send("Page.captureScreenshot", session, format="png")
        shot.write_bytes(base64.b64decode(image["data"]))

        requests = [
            e["params"]["request"]["url"]
            for e in tools.events
            if e["method"] == "Network.requestWillBeSent"
        ]
        assert requests and all(url.startswith("file://") for url in requests), requests
        errors = [
            e["params"]
            for e in tools.events
            if e["method"] == "Runtime.exceptionThrown"
            or (
                e["method"] == "Runtime.consoleAPICalled"
                and e["params"]["type"] in ("error", "assert")
            )
            or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
        ]
        assert errors == []


def _artifact(tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("TELEPHONY_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def _raw(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f][1:]


@pytest.mark.parametrize("name", ["early_barge_in", "dtmf_mid_call"])
def test_a_recorded_calls_report_in_chromium(name: str, tmp_path: Path) -> None:
    _chromium()
    path = CALLS / f"{name}.jsonl.gz"
    page = tmp_path / f"{name}.html"
    report = build_report(load_recording(path))
    page.write_text(render(report))
    lanes = {"caller": report.caller, "agent": report.agent}
    asyncio.run(_check_page(page, _raw(path), lanes, _artifact(tmp_path, f"report-{name}.png")))


def test_a_replayed_barge_in_with_the_bridges_decisions_in_chromium(tmp_path: Path) -> None:
    """A recording made now carries hold and barge-in events and the heard-note: the page
    shows them where they happened, and the unheard words struck through."""
    _chromium()
    result = replay_in_process(CALLS / "late_barge_in.jsonl.gz")
    assert result.recording is not None
    entries = [e.data for e in result.recording.entries]
    assert {"hold", "barge_in"} <= {e.get("event") for e in entries if e["kind"] == "call"}
    page = tmp_path / "late_barge_in.html"
    report = build_report(result.recording)
    page.write_text(render(report))
    assert '<s class="unheard"' in page.read_text()
    lanes = {"caller": report.caller, "agent": report.agent}
    asyncio.run(_check_page(page, entries, lanes, _artifact(tmp_path, "report-late_barge_in.png")))
