"""JSON log lines on request, each line about a call with its call SID."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from telephony.testing.simulator import place_call

from .audio_tools import fixture
from .server import echo_process, wait_until


async def test_json_log_lines_carry_the_call_sid(tmp_path: Path) -> None:
    sid = "CA" + "7" * 32
    env = {"TELEPHONY_LOG_FORMAT": "json"}
    with echo_process(tmp_path, env=env, capture=True) as (proc, url):
        async with place_call(url, call_sid=sid) as sim:
            await wait_until(lambda: sim.log.heard, 5, "the greeting")
            await sim.say(fixture("stop"))
            await sim.finish_speaking()
            await sim.hang_up()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=15)
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert lines and len(lines) == len([line for line in output.splitlines() if line.strip()])
    about_the_call = [line for line in lines if sid in line["message"]]
    assert len(about_the_call) >= 3  # incoming, stream attached, ended, ...
    assert all(line["call_sid"] == sid for line in about_the_call)
    assert {"time", "level", "logger", "message"} <= set(about_the_call[0])
