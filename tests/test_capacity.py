"""Admission control: past its capacity the server turns new calls away with a busy message,
so the calls it has keep sounding right."""

from __future__ import annotations

import asyncio
import time
import xml.etree.ElementTree as ET

from telephony.server.app import create_app
from telephony.settings import Settings
from telephony.testing.simulator import WebhookError, place_call


async def _voice(app, sid: str) -> ET.Element:  # type: ignore[no-untyped-def]
    response = await app.test_client().post("/voice", form={"CallSid": sid, "From": "+1"})
    return ET.fromstring(await response.get_data(as_text=True))


async def test_calls_beyond_max_calls_are_turned_away() -> None:
    app = create_app(Settings(agent="echo", session_db="", max_calls=1))
    async with app.test_app():
        async with place_call(app=app, call_sid="CA1"):
            twiml = await _voice(app, "CA2")
            assert twiml.find("Connect") is None and twiml.find("Hangup") is not None
            assert "try again" in (twiml.findtext("Say") or "")
            try:
                async with place_call(app=app, call_sid="CA3"):
                    raise AssertionError("a call over the limit was connected")
            except WebhookError as exc:
                assert "no <Connect><Stream" in str(exc)
        await asyncio.sleep(0.3)  # the first call has ended: room again
        assert (await _voice(app, "CA4")).find("Connect") is not None


async def test_a_late_event_loop_turns_new_calls_away() -> None:
    app = create_app(Settings(agent="echo", session_db="", max_loop_lag_ms=30, max_loop_busy=0))
    async with app.test_app():
        assert (await _voice(app, "CA1")).find("Connect") is not None
        for _ in range(20):  # CPU-bound work hogging the loop, as too many calls would
            time.sleep(0.1)
            await asyncio.sleep(0)
        health = await (await app.test_client().get("/healthz")).get_json()
        assert health["loop_lag_ms"] > 30
        assert (await _voice(app, "CA2")).find("Connect") is None
        for _ in range(80):
            await asyncio.sleep(0.1)
        assert (await _voice(app, "CA3")).find("Connect") is not None  # recovered


def _compute(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def test_a_saturated_event_loop_turns_new_calls_away() -> None:
    """Many short callbacks, one after the other: the loop is never late by much, yet it
    has no time to spare, and more calls would make every call's answers late. (The busy share
    is CPU time over wall time: beside other test workers on two cores a saturated loop gets
    part of a core, and reads 0.6-0.7 rather than 1.)"""
    app = create_app(Settings(agent="echo", session_db="", max_loop_lag_ms=0, max_loop_busy=0.4))
    async with app.test_app():
        assert (await _voice(app, "CA1")).find("Connect") is not None
        for _ in range(1000):  # 5 s of 5 ms slices, other work only between them
            _compute(0.005)
            await asyncio.sleep(0)
        health = await (await app.test_client().get("/healthz")).get_json()
        assert health["loop_busy"] > 0.4 and health["loop_lag_ms"] < 50
        twiml = await _voice(app, "CA2")
        assert twiml.find("Connect") is None and twiml.find("Hangup") is not None
        for _ in range(80):
            await asyncio.sleep(0.1)
        assert (await _voice(app, "CA3")).find("Connect") is not None  # recovered


def test_metrics_after_a_call() -> None:
    from telephony.testing.virtual_clock import run_virtual

    from .audio_tools import fixture

    async def call() -> str:
        app = create_app(Settings(agent="echo", session_db=""))
        async with app.test_app():
            async with place_call(app=app) as sim:
                await asyncio.sleep(1.0)
                await sim.say(fixture("stop"))
                await sim.finish_speaking()
                await asyncio.sleep(4.0)
                await sim.hang_up()
            await asyncio.sleep(0.5)
            response = await app.test_client().get("/metrics")
            return await response.get_data(as_text=True)

    text = run_virtual(call())
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert values["telephony_calls_total"] == "1"
    assert values["telephony_calls_active"] == "0"
    assert values["telephony_session_events_lost_total"] == "0"
    assert int(values["telephony_agent_audio_gap_seconds_count"]) > 20
    # on a virtual clock nothing is ever late: every message in the first bucket
    assert (
        values['telephony_agent_audio_gap_seconds_bucket{le="0.001"}']
        == values["telephony_agent_audio_gap_seconds_count"]
    )
