"""Outbound calls: `POST /calls` and `telephony call` refuse bad input with clear errors before
anything is sent to Twilio; Twilio's own refusals come back with its code."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from telephony.testing.simulator import place_call
from telephony.twilio.signatures import SignatureChecker

from .server import RunningServer, free_port, running_server, wait_until

TOKEN = "calls-token-0123456789"
ACCOUNT = "AC" + "0" * 32


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Credentials, a caller ID and a REST API nobody answers at (nothing reaches Twilio)."""
    with running_server(
        tmp_path_factory.mktemp("outbound"),
        calls_token=TOKEN,
        caller_id="+15550001000",
        twilio_account_sid=ACCOUNT,
        twilio_api_key="SK" + "1" * 32,
        twilio_api_secret="secret",
        rest_api_url=f"http://127.0.0.1:{free_port()}",
    ) as running:
        yield running


def _post(
    server: RunningServer, body: object, token: str | None = TOKEN
) -> tuple[int, dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        server.base_url + "/calls", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_post_calls_needs_its_bearer_token(server: RunningServer) -> None:
    assert _post(server, {"to": "+15551234567"}, token=None)[0] == 401
    assert _post(server, {"to": "+15551234567"}, token="guess")[0] == 401


def test_post_calls_is_off_without_a_token(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        status, body = _post(server, {"to": "+15551234567"})
    assert status == 403 and "TELEPHONY_CALLS_TOKEN" in body["error"]


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ("+15551234567", 400, "must be JSON"),
        ({"to": 15551234567}, 400, "must be JSON"),
        ({"to": "555-1234"}, 400, "international form"),
        ({"to": "+15551234567", "from": "me"}, 400, "from: 'me'"),
        ({"to": "+15551234567"}, 502, "could not reach Twilio"),
    ],
)
def test_bad_calls_get_clear_errors(
    server: RunningServer, body: object, status: int, says: str
) -> None:
    got, answer = _post(server, body)
    assert got == status and says in answer["error"]


def test_missing_credentials_are_named(tmp_path: Path) -> None:
    with running_server(tmp_path, calls_token=TOKEN, caller_id="+15550001000") as server:
        status, body = _post(server, {"to": "+15551234567"})
    assert status == 503 and "TWILIO_ACCOUNT_SID" in body["error"]


def test_the_command_names_what_is_wrong(tmp_path: Path) -> None:
    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "telephony.cli", "call", *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin", **env},
            cwd=tmp_path,
        )

    done = run("+15551234567")
    assert done.returncode == 2 and "TELEPHONY_PUBLIC_URL" in done.stderr
    done = run("12", TELEPHONY_PUBLIC_URL="http://127.0.0.1:9")
    assert done.returncode == 1 and "international form" in done.stderr
    done = run("+15551234567", "--from", "+15550001000", TELEPHONY_PUBLIC_URL="http://127.0.0.1:9")
    assert done.returncode == 1 and "TWILIO_ACCOUNT_SID" in done.stderr
    assert "Traceback" not in done.stderr


def test_status_callbacks_are_signature_checked_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="telephony")
    with running_server(tmp_path, twilio_auth_token="auth-token") as server:
        url = server.base_url + "/status"
        form = {"CallSid": "CA9", "CallStatus": "completed", "CallDuration": "42"}
        signature = SignatureChecker("auth-token", server.base_url).sign(url, form)
        for sig, expected in (("forged", 403), (signature, 204)):
            request = urllib.request.Request(
                url,
                data=urllib.parse.urlencode(form).encode(),
                headers={"X-Twilio-Signature": sig},
            )
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    status = response.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            assert status == expected
    assert "call CA9: Twilio reports completed after 42 s" in caplog.text


async def test_twilio_reporting_a_call_over_ends_it_here(tmp_path: Path) -> None:
    """The caller hung up while no stream carried the call (Twilio playing keys, say): the
    live session is not kept open for nobody."""
    with running_server(tmp_path) as server:
        async with place_call(server.base_url, call_sid="CA" + "4" * 32) as sim:
            await wait_until(lambda: server.calls.get(sim.call_sid) is not None, 5, "the call")
            form = urllib.parse.urlencode({"CallSid": sim.call_sid, "CallStatus": "completed"})
            request = urllib.request.Request(server.base_url + "/status", data=form.encode())
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.status == 204
            await wait_until(lambda: server.calls.get(sim.call_sid) is None, 5, "the call to end")
