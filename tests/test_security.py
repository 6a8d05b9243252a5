"""Security defaults: no public server without signature checks, nothing secret or personal in
the logs when asked."""

from __future__ import annotations

import asyncio
import logging

import pytest

from telephony.call.logs import mask_number
from telephony.server.app import create_app
from telephony.settings import Settings, SettingsError
from telephony.testing.simulator import place_call
from telephony.testing.virtual_clock import run_virtual

from .audio_tools import fixture

TOKEN = "secret-token-0123456789"
CALLER = "+15551234567"


def test_a_public_url_without_a_token_is_refused_unless_insecure() -> None:
    env = {"TELEPHONY_PUBLIC_URL": "https://phone.example.com"}
    with pytest.raises(SettingsError, match="TWILIO_AUTH_TOKEN is not set"):
        Settings.from_env(env)
    assert Settings.from_env({**env, "TELEPHONY_INSECURE": "1"}).insecure
    assert Settings.from_env({**env, "TWILIO_AUTH_TOKEN": TOKEN}).twilio_auth_token == TOKEN
    assert Settings.from_env({"TELEPHONY_PUBLIC_URL": "http://127.0.0.1:8080"})  # local: fine
    with pytest.raises(SettingsError, match="TELEPHONY_INSECURE must be 1/true"):
        Settings.from_env({**env, "TELEPHONY_INSECURE": "maybe"})


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("+15551234567", "+*******4567"),
        ("sip:alice@example.com", "*********************"),
        ("+44 20 7946 0958", "+** ** **** 0958"),
        ("", ""),
    ],
)
def test_mask_number(number: str, masked: str) -> None:
    assert mask_number(number) == masked


def test_secrets_and_personal_data_stay_out_of_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    public = "https://phone.example.com"
    settings = Settings(
        agent="echo",
        session_db="",
        public_url=public,
        twilio_auth_token=TOKEN,
        mask_callers=True,
    )

    async def call() -> None:
        app = create_app(settings)
        async with app.test_app():
            async with place_call(
                app=app, auth_token=TOKEN, public_url=public, caller=CALLER
            ) as sim:
                await asyncio.sleep(1.0)
                await sim.say(fixture("stop"))
                await sim.press("7")
                await sim.finish_speaking()
                await asyncio.sleep(5.0)
                await sim.hang_up()
            await asyncio.sleep(0.5)

    run_virtual(call())
    text = caplog.text
    assert "caller said: (" in text and "agent said: (" in text  # the call did happen
    assert "incoming from +*******1111" not in text and "+*******4567" in text
    assert TOKEN not in text
    assert CALLER not in text and "1234567" not in text
    assert "pressed 7" not in text and "pressed a key" in text
    assert "caller spoke for" not in text


def test_each_instance_sends_its_streams_back_to_itself() -> None:
    """Several instances behind one webhook address: Twilio signs the webhook for the shared
    address and the upgrade for the instance's own, and both checks pass."""
    shared, own = "https://voice.example.com", "https://a1.voice.example.com"
    with pytest.raises(SettingsError, match="TELEPHONY_STREAM_URL must be a bare origin"):
        Settings.from_env({"TELEPHONY_STREAM_URL": own + "/x", "TWILIO_AUTH_TOKEN": TOKEN})
    with pytest.raises(SettingsError, match="TELEPHONY_STREAM_URL is public"):
        Settings.from_env({"TELEPHONY_STREAM_URL": own})

    async def call(stream_url: str) -> list[str]:
        settings = Settings(
            agent="echo",
            session_db="",
            public_url=shared,
            stream_url=stream_url,
            twilio_auth_token=TOKEN,
        )
        app = create_app(settings)
        async with app.test_app():
            async with place_call(app=app, auth_token=TOKEN, public_url=shared) as sim:
                await asyncio.sleep(2.0)
                await sim.hang_up()
                return [sim.stream_url, *sim.log.protocol_errors]

    assert run_virtual(call(own)) == ["wss://a1.voice.example.com/stream"]
    assert run_virtual(call("")) == ["wss://voice.example.com/stream"]


def test_a_server_reachable_by_others_needs_the_twilio_token() -> None:
    """Every unsigned POST to /voice would start a billed live session."""
    with pytest.raises(SettingsError, match="TELEPHONY_HOST 0.0.0.0 is reachable"):
        Settings.from_env({}, host="0.0.0.0")
    assert Settings.from_env({"TWILIO_AUTH_TOKEN": TOKEN}, host="0.0.0.0").host == "0.0.0.0"
    assert Settings.from_env({"TELEPHONY_INSECURE": "1"}, host="0.0.0.0").insecure
    assert Settings.from_env({}).local  # the default listens on loopback


def test_metrics_and_health_details_are_for_the_operator_only() -> None:
    admin = "admin-token-0123456789"

    async def fetch(settings: Settings, token: str = "") -> list[tuple[str, int, object]]:
        app = create_app(settings)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with app.test_app():
            client = app.test_client()
            health = await client.get("/healthz", headers=headers)
            metrics = await client.get("/metrics", headers=headers)
            return [
                ("healthz", health.status_code, sorted(await health.get_json())),
                ("metrics", metrics.status_code, metrics.headers.get("WWW-Authenticate")),
            ]

    public = {"public_url": "https://voice.example.com", "twilio_auth_token": TOKEN}
    local = Settings(agent="echo", session_db="")
    behind_a_proxy = Settings(agent="echo", session_db="", **public)  # e.g. ngrok to loopback
    guarded = Settings(agent="echo", session_db="", admin_token=admin, **public)
    assert run_virtual(fetch(local))[1][1] == 200
    assert run_virtual(fetch(behind_a_proxy)) == [
        ("healthz", 200, ["status"]),
        ("metrics", 401, "Bearer"),
    ]
    assert run_virtual(fetch(guarded, "wrong")) == run_virtual(fetch(behind_a_proxy))
    [health, metrics] = run_virtual(fetch(guarded, admin))
    assert health[1] == 200 and "active_calls" in health[2]  # type: ignore[operator]
    assert metrics[1] == 200
