"""Outbound calls end to end, offline: `POST /calls` on the real server creates the call with
the twilio client against the Twilio REST stand-in, which rings, answers as a person or a
machine, posts our webhook and callbacks, and streams through the caller simulator; the agent
is the built-in one on the Gemini stand-in."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from telephony.testing.gemini_live import GeminiLiveService
from telephony.testing.twilio_rest import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    FROM_NUMBER,
    FarEnd,
    TwilioRestService,
    running_in_thread,
)

from .server import RunningServer, free_port, rise, running_server, scrape
from .test_realpath import _connections, _session
from .test_realpath import gemini as gemini  # the module fixture, shared

TOKEN = "outbound-calls-token"
API_KEY, API_SECRET = "SK" + "7" * 32, "api-secret"
NOT_PLACED = "telephony_outbound_calls_not_placed_total"
PERSON, MACHINE, BUSY = "+15557650001", "+15557650002", "+15557650003"


@pytest.fixture(scope="module")
def twilio() -> Iterator[TwilioRestService]:
    far_ends = {PERSON: FarEnd("human", ring_s=0.3), MACHINE: FarEnd("machine", ring_s=0.3)}
    with running_in_thread(api_keys={API_KEY: API_SECRET}, far_ends=far_ends) as service:
        yield service


@pytest.fixture(scope="module")
def server(
    gemini: GeminiLiveService, twilio: TwilioRestService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    with running_server(
        tmp_path_factory.mktemp("outbound"), agent="", **_outbound(twilio)
    ) as running:
        yield running


def _outbound(twilio: TwilioRestService) -> dict[str, object]:
    """Settings for placing calls through the stand-in."""
    return {
        "twilio_auth_token": AUTH_TOKEN,
        "twilio_account_sid": ACCOUNT_SID,
        "twilio_api_key": API_KEY,
        "twilio_api_secret": API_SECRET,
        "caller_id": FROM_NUMBER,
        "calls_token": TOKEN + "-0123456789",
        "rest_api_url": twilio.base_url,
    }


def _calls(server: RunningServer, to: str) -> urllib.request.Request:
    """`POST /calls` for `to`, with the token."""
    return urllib.request.Request(
        server.base_url + "/calls",
        data=json.dumps({"to": to}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}-0123456789"},
    )


def _place(server: RunningServer, to: str) -> str:
    with urllib.request.urlopen(_calls(server, to), timeout=10) as response:
        assert response.status == 201
        return str(json.loads(response.read())["call_sid"])


async def test_an_outbound_call_answered_by_a_person(
    server: RunningServer, twilio: TwilioRestService, gemini: GeminiLiveService
) -> None:
    first, requests = len(gemini.connections), len(twilio.requests)
    sid = _place(server, PERSON)
    [create] = twilio.requests[requests:]
    base = server.base_url
    assert (create.method, create.path, create.credential) == (
        "POST",
        f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json",
        API_KEY,
    )
    assert create.form == {
        "To": [PERSON],
        "From": [FROM_NUMBER],
        "Url": [f"{base}/voice"],
        "Method": ["POST"],
        "StatusCallback": [f"{base}/status"],
        "StatusCallbackEvent": ["initiated", "ringing", "answered", "completed"],
        "StatusCallbackMethod": ["POST"],
        "MachineDetection": ["DetectMessageEnd"],
        "AsyncAmd": ["true"],
        "AsyncAmdStatusCallback": [f"{base}/answered-by"],
        "AsyncAmdStatusCallbackMethod": ["POST"],
    }
    call = twilio.calls[sid]
    await twilio.wait_for(lambda: call.answered_by is not None, 15)
    assert call.answered_by == "human"
    await twilio.wait_for(lambda: _answered_by(server, sid) == "human", 5)  # in the state
    await twilio.wait_for(lambda: call.sim is not None and call.sim.log.heard, 10)  # answered
    await twilio.run(call.sim.hang_up())  # type: ignore[union-attr]
    await twilio.wait_for(lambda: call.settled, 10)
    statuses = [c.form["CallStatus"] for c in call.callbacks if c.kind == "status"]
    assert statuses == ["initiated", "ringing", "in-progress", "completed"]
    assert all(c.status == 204 for c in call.callbacks)  # every callback taken, signed
    [connection] = _connections(gemini, first)
    assert connection.text_turns == []  # no greeting (the person speaks first), no interruption


async def test_a_machine_gets_the_message_after_its_beep(
    server: RunningServer, twilio: TwilioRestService, gemini: GeminiLiveService
) -> None:
    first = len(gemini.connections)
    sid = _place(server, MACHINE)
    call = twilio.calls[sid]
    await twilio.wait_for(lambda: call.answered_by is not None, 15)
    assert call.answered_by == "machine_end_beep"
    await twilio.wait_for(lambda: len(call.message()) > 8000, 10)  # the agent speaks after it
    [connection] = _connections(gemini, first)
    [told] = [t for t in connection.text_turns if "answering machine" in t]
    assert "leave your message now" in told
    message = call.message().astype(np.float64)
    assert np.sqrt(np.mean(message**2)) > 300  # a voice on the recording, not silence
    await twilio.run(call.sim.hang_up())  # type: ignore[union-attr]
    await twilio.wait_for(lambda: call.settled, 10)


def _answered_by(server: RunningServer, call_sid: str) -> object:
    return _session(server, call_sid, FROM_NUMBER).state.get("telephony_answered_by")


@pytest.mark.parametrize(("status", "code"), [(500, 20500), (429, 20429)])
def test_twilio_refusing_the_call_comes_back_with_its_code(
    server: RunningServer, twilio: TwilioRestService, status: int, code: int
) -> None:
    twilio.fail_next(status)
    start = scrape(server.base_url)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(_calls(server, PERSON), timeout=10)
    assert refused.value.code == 502
    counted = rise(start, scrape(server.base_url), NOT_PLACED, reason="twilio")
    assert counted == 1
    error = json.loads(refused.value.read())["error"]
    assert error.startswith(f"Twilio refused the call (HTTP {status}, error {code})")


async def test_outbound_calls_beyond_the_limit_are_refused_until_one_is_over(
    twilio: TwilioRestService, tmp_path: Path
) -> None:
    """One at a time: while the first rings, a second is refused (429); once Twilio reports
    the first over (busy), the next goes through."""
    twilio.far_ends[BUSY] = FarEnd("busy", ring_s=1.0)
    with running_server(tmp_path, max_outbound_calls=1, **_outbound(twilio)) as server:
        call = twilio.calls[_place(server, BUSY)]
        start = scrape(server.base_url)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(_calls(server, PERSON), timeout=10)
        assert refused.value.code == 429
        counted = rise(start, scrape(server.base_url), NOT_PLACED, reason="max_outbound_calls")
        assert counted == 1
        await twilio.wait_for(lambda: call.settled, 10)
        assert call.status == "busy"
        _place(server, BUSY)


def _call_command(twilio: TwilioRestService, tmp: Path, to: str) -> subprocess.Popen[str]:
    """`telephony call TO echo`, as a user runs it: it serves the echo agent itself."""
    port = free_port()
    env = {
        "TELEPHONY_PORT": str(port),
        "TELEPHONY_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "TELEPHONY_SESSION_DB": str(tmp / "sessions.db"),
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_API_KEY": API_KEY,
        "TWILIO_API_SECRET": API_SECRET,
        "TELEPHONY_CALLER_ID": FROM_NUMBER,
        "TELEPHONY_REST_API_URL": twilio.base_url,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "telephony.cli", "call", to, "echo"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_telephony_call_with_an_agent_serves_it_until_twilio_reports_the_call_over(
    twilio: TwilioRestService, tmp_path: Path
) -> None:
    proc = _call_command(twilio, tmp_path, PERSON)
    try:
        assert proc.stdout is not None
        sid = (await asyncio.to_thread(proc.stdout.readline)).strip()
        call = twilio.calls[sid]
        await twilio.wait_for(lambda: call.sim is not None and call.sim.log.heard, 15)
        assert proc.poll() is None  # the call is on: the agent is still served
        await twilio.run(call.sim.hang_up())  # type: ignore[union-attr]
        code = await asyncio.to_thread(proc.wait, 20)
        assert (code, call.status) == (0, "completed")
        assert all(c.status == 204 for c in call.callbacks)  # its callbacks reached it, signed
    finally:
        proc.kill()


async def test_telephony_call_with_an_agent_says_how_an_unanswered_call_ended(
    twilio: TwilioRestService, tmp_path: Path
) -> None:
    twilio.far_ends[BUSY] = FarEnd("busy", ring_s=0.3)
    proc = _call_command(twilio, tmp_path, BUSY)
    try:
        out, err = await asyncio.to_thread(proc.communicate, timeout=20)
        assert proc.returncode == 1
        assert out.strip() in twilio.calls
        assert f"the call to {BUSY} was not completed: busy" in err
    finally:
        proc.kill()
