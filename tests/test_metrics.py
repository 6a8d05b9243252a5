"""`GET /metrics` through a real server on loopback, scraped while simulated calls run: the
figures move during a call, and each ended or refused call is counted by how it ended."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from telephony.testing.simulator import CallerSimulator, WebhookError, place_call

from .audio_tools import speech_span_s
from .server import (
    RunningServer,
    Samples,
    calls_ended,
    rise,
    running_server,
    sample,
    say,
    scrape,
    wait_until,
)

TOKEN = "test-auth-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(
        tmp_path_factory.mktemp("metrics"), twilio_auth_token=TOKEN, max_calls=1
    ) as running:
        yield running


_sids = iter(range(1, 10**6))


def _call(server: RunningServer, **kwargs: object):  # type: ignore[no-untyped-def]
    sid = f"CA{next(_sids):032d}"
    return place_call(server.base_url, auth_token=TOKEN, call_sid=sid, **kwargs)  # type: ignore[arg-type]


async def _scrape(server: RunningServer) -> Samples:
    return await asyncio.to_thread(scrape, server.base_url)


def _media_after(sim: CallerSimulator, t: float) -> list[float]:
    return [at for at, _ in sim.log.media if at > t]


async def _gone(server: RunningServer, sid: str) -> None:
    await wait_until(lambda: server.calls.get(sid) is None, 5, "the call to end")


async def test_figures_move_while_the_call_runs(server: RunningServer) -> None:
    start = await _scrape(server)
    latency, reaction = "telephony_response_latency_seconds", "telephony_barge_in_reaction_seconds"
    async with _call(server) as sim:
        await wait_until(lambda: bool(sim.log.media), 2, "the greeting")
        during = await _scrape(server)
        assert sample(during, "telephony_calls_active", direction="inbound") == 1
        assert sample(during, "telephony_calls_active", direction="outbound") == 0
        await asyncio.sleep(1.0)  # the greeting chime is over

        # the echo agent answers: the wait, measured from where the server heard speech end
        spoken, _ = await say(sim, "hello")
        speech_end = spoken + speech_span_s("hello")[1]
        await wait_until(lambda: bool(_media_after(sim, speech_end)), 3, "the echo")
        heard_wait = _media_after(sim, speech_end)[0] - speech_end
        answered = await _scrape(server)
        assert rise(start, answered, f"{latency}_count") == 1
        measured = rise(start, answered, f"{latency}_sum")
        print(f"response latency: {measured:.3f} s measured, {heard_wait:.3f} s heard")
        assert 0.3 < measured < 1.5
        assert abs(measured - heard_wait) < 0.15  # loopback: sent is received

        # the caller talks over the reply: one clear, counted at once
        await asyncio.sleep(_media_after(sim, speech_end)[0] + 0.25 - time.monotonic())
        spoken, _ = await say(sim, "stop")
        onset = spoken + speech_span_s("stop")[0]
        await wait_until(lambda: bool(sim.log.clears), 1, "a clear")
        call = server.calls.get(sim.call_sid)
        assert call is not None
        # long enough to be a barge-in, not a held "mm-hm"
        await wait_until(lambda: call.barge_ins == 1, 2, "the barge-in")
        barged = await _scrape(server)
        assert rise(start, barged, f"{reaction}_count") == 1
        measured = rise(start, barged, f"{reaction}_sum")
        print(f"barge-in reaction: {measured:.3f} s measured, {sim.log.clears[0] - onset:.3f} s")
        assert 0.02 < measured < 0.3
        assert abs(measured - (sim.log.clears[0] - onset)) < 0.1
        assert rise(start, barged, "telephony_clears_total") == len(sim.log.clears) == 1
        assert rise(start, barged, "telephony_barge_ins_total") == 1
        assert rise(start, barged, "telephony_agent_audio_gap_seconds_count") > 0
        assert sample(barged, "telephony_calls_active", direction="inbound") == 1
        await sim.hang_up()
    await _gone(server, sim.call_sid)
    end = await _scrape(server)
    assert calls_ended(start, end, "hung_up") == 1
    assert sample(end, "telephony_calls_active", direction="inbound") == 0
    # what the call counted stays counted once it has ended
    for name in ("telephony_clears_total", f"{latency}_count", f"{reaction}_count"):
        assert sample(end, name) == sample(barged, name), name


async def test_an_outbound_call_whose_stream_breaks_is_counted_as_such(
    server: RunningServer,
) -> None:
    start = await _scrape(server)
    async with _call(server, webhook_fields={"Direction": "outbound-api"}) as sim:
        await wait_until(lambda: server.calls.get(sim.call_sid) is not None, 2, "the call")
        during = await _scrape(server)
        assert sample(during, "telephony_calls_active", direction="outbound") == 1
        await sim.close()  # the socket goes without Twilio's stop
    await _gone(server, sim.call_sid)
    end = await _scrape(server)
    assert calls_ended(start, end, "stream_error", direction="outbound") == 1
    assert sample(end, "telephony_calls_active", direction="outbound") == 0


async def test_a_refused_call_is_counted_with_its_reason(server: RunningServer) -> None:
    start = await _scrape(server)
    async with _call(server) as sim:
        with pytest.raises(WebhookError, match="no <Connect><Stream"):
            async with _call(server):
                raise AssertionError("a call over TELEPHONY_MAX_CALLS was connected")
        await sim.hang_up()
    await _gone(server, sim.call_sid)
    end = await _scrape(server)
    assert rise(start, end, "telephony_calls_refused_total", reason="max_calls") == 1
    assert calls_ended(start, end, "refused") == 1


def test_the_process_and_server_figures_are_there(server: RunningServer) -> None:
    with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    samples = scrape(server.base_url)
    assert sample(samples, "process_cpu_seconds_total") > 0
    assert sample(samples, "process_resident_memory_bytes") > 10 * 2**20
    assert sample(samples, "process_open_fds") > 0
    assert 0 <= sample(samples, "telephony_loop_busy_ratio") <= 1
    assert sample(samples, "telephony_loop_lag_seconds") >= 0
    assert sample(samples, "telephony_session_events_lost_total") == 0
    assert sample(samples, "telephony_call_cost_ratio") > 0
