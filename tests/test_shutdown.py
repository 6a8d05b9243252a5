"""Graceful shutdown of `telephony serve` on SIGTERM: new calls are turned away politely,
health says draining, active calls go on for the drain time, then hear a goodbye; every
transcript is in the session database; the process exits cleanly."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

from telephony.call import asset
from telephony.testing.simulator import place_call

from .audio_tools import best_correlation, fixture, pcm
from .server import echo_process


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _post(url: str, form: bytes) -> str:
    with urllib.request.urlopen(urllib.request.Request(url, data=form), timeout=2) as response:
        return response.read().decode()


async def test_sigterm_drains_calls_then_says_goodbye(tmp_path: Path) -> None:
    db = tmp_path / "sessions.db"
    with echo_process(tmp_path, env={"TELEPHONY_DRAIN_S": "4"}, capture=True) as (proc, url):
        sid = "CA" + "f" * 32
        async with place_call(url, call_sid=sid) as sim:
            await asyncio.sleep(1.0)
            await sim.say(fixture("hello"))
            await sim.finish_speaking()
            await asyncio.sleep(1.5)  # the echo is playing
            terminated = asyncio.get_running_loop().time()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            status, body = await asyncio.to_thread(_get, url + "/healthz")
            health = json.loads(body)
            assert status == 503 and (health["status"], health["active_calls"]) == ("draining", 1)
            twiml = await asyncio.to_thread(_post, url + "/voice", b"CallSid=CA2&From=%2B1")
            say = ET.fromstring(twiml).find("Say")
            assert say is not None and "try again" in (say.text or "")
            assert ET.fromstring(twiml).find("Hangup") is not None
            # The call goes on through the drain time, then hears the goodbye and ends.
            await asyncio.wait_for(sim.closed.wait(), 20)
            ended = asyncio.get_running_loop().time()
        assert ended - terminated >= 4.0
        goodbye = pcm(asset("goodbye"))
        heard = sim.log.heard_pcm()
        assert best_correlation(heard, goodbye)[0] > 0.95
        assert len(heard) / 8000 >= ended - sim.log.started - 0.5  # all of it before hanging up
        output, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, output
    assert "draining: 1 active call(s)" in output
    assert f"call {sid}: ended: server shutting down" in output
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT event_data FROM events WHERE session_id = ?", (sid,))
        stored = " ".join(row[0] for row in rows)
    assert "(caller spoke for 4.0 s)" in stored  # the transcript was flushed


async def test_an_idle_server_stops_at_once(tmp_path: Path) -> None:
    with echo_process(tmp_path) as (proc, _):
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 3


async def test_a_second_signal_stops_during_the_drain(tmp_path: Path) -> None:
    with echo_process(tmp_path, env={"TELEPHONY_DRAIN_S": "30"}, capture=True) as (proc, url):
        async with place_call(url) as sim:
            await asyncio.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert proc.poll() is None and not sim.closed.is_set()  # draining
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(sim.closed.wait(), 10)
        output, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, output
        assert time.monotonic() - started < 10
    assert "second signal: stopping now" in output
