"""A 30-minute call on a virtual clock: the model sends `go_away` every 3 minutes, the caller
talks every 2; the call keeps working to the end and the server's memory stays flat."""

from __future__ import annotations

import asyncio
import gc
import resource
from pathlib import Path

from telephony.agents import AgentSpec, phone_run_config
from telephony.agents.echo import EchoFaults, EchoLlm, echo_app
from telephony.server.app import create_app
from telephony.settings import Settings
from telephony.testing.simulator import place_call
from telephony.testing.virtual_clock import run_virtual

from .audio_tools import fixture

MINUTES = 30


def _rss_mb() -> float:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_a_30_minute_call_with_go_away_every_3_minutes(tmp_path: Path) -> None:
    settings = Settings(agent="echo", session_db="", caller_idle_s=0.0)  # silent for minutes
    echo = echo_app(faults=EchoFaults(go_away_after_s=180.0), keep_connections=True)
    app = create_app(settings, AgentSpec(echo, phone_run_config(settings), None))
    rss: dict[int, float] = {}
    answered: list[int] = []

    async def call() -> None:
        loop = asyncio.get_running_loop()
        async with app.test_app():
            async with place_call(app=app) as sim:
                for minute in range(MINUTES):
                    for half in range(2):
                        await asyncio.sleep(20.0)
                        if half == 1 and minute % 2 == 0:
                            said = await sim.say(fixture("stop"))
                            await sim.finish_speaking()
                            await asyncio.sleep(5.0)
                            if [h for h in sim.log.heard if h.start > said]:
                                answered.append(minute)
                        # the harness keeps no audio: only the server's memory is measured
                        sim.log.sent.clear()
                        sim.log.heard.clear()
                        sim.log.media.clear()
                    await asyncio.sleep(max(0.0, sim.log.started + 60 * (minute + 1) - loop.time()))
                    if minute in (5, MINUTES - 1):
                        rss[minute] = _rss_mb()
                assert len(app.extensions["telephony.calls"]) == 1
                await sim.hang_up()

    run_virtual(call())
    model = echo.root_agent.model
    assert isinstance(model, EchoLlm)
    assert len(model.connections) >= MINUTES // 3  # a new connection after every go_away
    assert all(c.resumed for c in model.connections[1:])
    assert answered == list(range(0, MINUTES, 2))  # every question answered, to the end
    assert rss[MINUTES - 1] - rss[5] < 15, rss
