"""End to end: the real server on loopback, the Twilio side played over a real WebSocket with
real speech, the echo agent answering through ADK's Runner.run_live."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.adk.sessions import DatabaseSessionService
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from telephony.testing.simulator import CallerSimulator, WebhookError, place_call

from .audio_tools import best_correlation, fixture, line_noise, speech_core, speech_span_s
from .server import RunningServer, running_server, say, wait_until

TOKEN = "test-auth-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("e2e")
    with running_server(tmp, twilio_auth_token=TOKEN) as running:
        yield running


_sids = iter(range(1, 10**6))


def _call(server: RunningServer, **kwargs: object):  # type: ignore[no-untyped-def]
    sid = f"CA{next(_sids):032d}"
    return place_call(server.base_url, auth_token=TOKEN, call_sid=sid, **kwargs)  # type: ignore[arg-type]


def _media_after(sim: CallerSimulator, t: float) -> list[float]:
    return [at for at, _ in sim.log.media if at > t]


async def _hang_up_and_check_clean(server: RunningServer, sim: CallerSimulator) -> None:
    sid = sim.call_sid
    await sim.hang_up()
    await wait_until(lambda: server.calls.get(sid) is None, 5, "the call to end")
    await wait_until(
        lambda: not [n for n in server.call_tasks() if n.endswith(sid)], 5, "call tasks to end"
    )


async def test_greeting_plays_as_soon_as_the_stream_opens(server: RunningServer) -> None:
    async with _call(server) as sim:
        await wait_until(lambda: bool(sim.log.media), 2, "the greeting chime")
        assert sim.log.media[0][0] - sim.log.started < 0.5
        await _hang_up_and_check_clean(server, sim)


async def test_caller_hears_their_own_words_back(server: RunningServer) -> None:
    async with _call(server) as sim:
        await asyncio.sleep(1.0)
        _, spoken_end = await say(sim, "hello")
        await wait_until(lambda: bool(_media_after(sim, spoken_end)), 3, "the echo")
        response_latency = _media_after(sim, spoken_end)[0] - spoken_end
        # about 600 ms of silence ends the turn; the bridge must add next to nothing
        assert response_latency < 1.2
        await asyncio.sleep(len(fixture("hello")) / 8000 + 0.8)
        score, _ = best_correlation(sim.log.heard_pcm(), speech_core("hello"))
        assert score > 0.9
        assert not sim.log.clears
        # every media message was followed by a mark, and every mark came back as played
        assert sim.log.marks_received == len(sim.log.media) == sim.log.marks_echoed
        await _hang_up_and_check_clean(server, sim)


@pytest.mark.parametrize(
    ("delay_into_reply", "model_still_generating"), [(0.25, True), (2.5, False)]
)
async def test_barge_in_clears_within_300_ms(
    server: RunningServer,
    caplog: pytest.LogCaptureFixture,
    delay_into_reply: float,
    model_still_generating: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="telephony")
    async with _call(server) as sim:
        await asyncio.sleep(1.0)
        _, spoken_end = await say(sim, "hello")
        await wait_until(lambda: bool(_media_after(sim, spoken_end)), 3, "the echo")
        reply_start = _media_after(sim, spoken_end)[0]
        await asyncio.sleep(reply_start + delay_into_reply - time.monotonic())
        onset, barge_end = await say(sim, "stop")
        await wait_until(lambda: bool(sim.log.clears), 1, "a clear")
        assert sim.log.clears[0] - onset <= 0.3
        # nothing of the interrupted reply after the clear: the next audio is the new echo,
        # which cannot start before the caller has been silent for about 600 ms
        speech_end = onset + speech_span_s("stop")[1]
        await asyncio.sleep(max(0.0, speech_end + 0.5 - time.monotonic()))
        assert [at for at, _ in sim.log.media if sim.log.clears[0] < at < speech_end + 0.5] == []
        assert len(sim.log.clears) == 1
        await wait_until(lambda: bool(_media_after(sim, barge_end)), 3, "the echo of the barge-in")
        await asyncio.sleep(len(fixture("stop")) / 8000 + 0.5)
        heard_after = sim.log.heard_pcm()[int((barge_end - sim.log.started) * 8000) :]
        score, _ = best_correlation(heard_after, speech_core("stop"))
        assert score > 0.9
        assert sim.log.marks_received == sim.log.marks_echoed
        await _hang_up_and_check_clean(server, sim)
    interrupted = [
        r
        for r in caplog.records
        if sim.call_sid in r.getMessage() and "interrupted it" in r.getMessage()
    ]
    assert bool(interrupted) == model_still_generating


async def test_noise_only_caller_triggers_no_clear(server: RunningServer) -> None:
    async with _call(server) as sim:
        noise = line_noise(8, "line", rms=1000) + line_noise(4, "rumble", rms=2000, seed=3)
        await sim.say(noise)
        await sim.finish_speaking()
        await asyncio.sleep(0.5)
        assert sim.log.clears == []
        await _hang_up_and_check_clean(server, sim)


async def test_caller_whose_frames_stop_still_gets_an_answer(server: RunningServer) -> None:
    async with _call(server, continuous=False) as sim:
        await sim.say(b"\xff" * 4000)
        _, spoken_end = await say(sim, "weather")
        await sim.finish_speaking()
        # no more frames at all: the bridge tells the model the audio ended
        await wait_until(lambda: bool(_media_after(sim, spoken_end)), 3, "the echo")
        await asyncio.sleep(len(fixture("weather")) / 8000 + 0.5)
        score, _ = best_correlation(sim.log.heard_pcm(), speech_core("weather"))
        assert score > 0.9
        await _hang_up_and_check_clean(server, sim)


async def test_socket_closed_without_stop_ends_the_call(server: RunningServer) -> None:
    async with _call(server) as sim:
        await wait_until(lambda: server.calls.get(sim.call_sid) is not None, 2, "the call")
        await sim.close()
        await wait_until(lambda: server.calls.get(sim.call_sid) is None, 5, "the call to end")
        await wait_until(
            lambda: not [n for n in server.call_tasks() if n.endswith(sim.call_sid)], 5, "tasks"
        )


async def test_two_calls_at_once_do_not_interfere(server: RunningServer) -> None:
    async with _call(server) as first, _call(server) as second:
        await asyncio.sleep(1.0)
        (_, end1), (_, end2) = await asyncio.gather(say(first, "hello"), say(second, "bonjour"))
        await asyncio.sleep(max(end1, end2) - time.monotonic() + 5.5)
        for sim, mine, other in ((first, "hello", "bonjour"), (second, "bonjour", "hello")):
            heard = sim.log.heard_pcm()
            assert best_correlation(heard, speech_core(mine))[0] > 0.9
            assert best_correlation(heard, speech_core(other))[0] < 0.5
        await _hang_up_and_check_clean(server, first)
        await _hang_up_and_check_clean(server, second)


async def test_dtmf_reaches_the_agent(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="telephony")
    async with _call(server) as sim:
        await sim.press("7")
        await wait_until(
            lambda: any("pressed 7" in r.getMessage() for r in caplog.records), 2, "the DTMF log"
        )
        await _hang_up_and_check_clean(server, sim)


async def test_transcripts_land_in_the_session_database(server: RunningServer) -> None:
    async with _call(server, caller="+15557654321") as sim:
        await asyncio.sleep(0.8)
        _, spoken_end = await say(sim, "stop")
        await wait_until(lambda: bool(_media_after(sim, spoken_end)), 3, "the echo")
        await asyncio.sleep(2.5)
        await _hang_up_and_check_clean(server, sim)
    store = server.settings.session_store()
    assert store is not None and store.startswith("sqlite+aiosqlite:///")
    sessions = DatabaseSessionService(store)
    session = await sessions.get_session(
        app_name="echo", user_id="+15557654321", session_id=sim.call_sid
    )
    await sessions.close()
    assert session is not None
    heard = [e.input_transcription.text for e in session.events if e.input_transcription]
    said = [e.output_transcription.text for e in session.events if e.output_transcription]
    assert any(t and t.startswith("(caller spoke for") for t in heard)
    assert "(chime)" in said and any(t and t.startswith("(echo of") for t in said)


async def test_bad_signatures_get_403(server: RunningServer) -> None:
    with pytest.raises(WebhookError) as caught:
        async with place_call(server.base_url, auth_token="wrong-token"):
            pass
    assert caught.value.status == 403
    with pytest.raises(WebhookError) as caught:
        async with place_call(server.base_url):
            pass
    assert caught.value.status == 403
    ws_url = server.base_url.replace("http", "ws") + "/stream"
    for headers in ({"X-Twilio-Signature": "forged"}, {}):
        with pytest.raises(InvalidStatus) as rejected:
            async with connect(ws_url, additional_headers=headers):
                pass
        assert rejected.value.response.status_code == 403
        assert rejected.value.response.body == b"invalid Twilio signature\n"  # the app's answer
    after = urllib.request.Request(
        server.base_url + "/after-stream",
        data=b"CallSid=CA1&CallStatus=in-progress",
        headers={"X-Twilio-Signature": "forged"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(urllib.request.urlopen, after, timeout=5)
    assert refused.value.code == 403  # nobody else may tell a call to dial out


def test_unsigned_requests_are_accepted_without_a_token(tmp_path: Path) -> None:
    async def call() -> None:
        async with place_call(server.base_url) as sim:
            await wait_until(lambda: bool(sim.log.media), 2, "the greeting")
            await sim.hang_up()

    with running_server(tmp_path) as server:
        asyncio.run(call())
