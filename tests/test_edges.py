"""TwiML, signatures and settings: the small pure pieces at the edge of the app."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from twilio.request_validator import RequestValidator

from telephony.settings import Settings, SettingsError
from telephony.twilio.signatures import SignatureChecker, websocket_url
from telephony.twilio.twiml import connect_stream


def test_connect_stream_twiml_carries_parameters() -> None:
    twiml = connect_stream("wss://example.com/stream", {"callSid": "CA1", "caller": "+1", "x": ""})
    stream = ET.fromstring(twiml).find("./Connect/Stream")
    assert stream is not None and stream.get("url") == "wss://example.com/stream"
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params == {"callSid": "CA1", "caller": "+1"}


def test_connect_stream_refuses_http_urls() -> None:
    with pytest.raises(ValueError, match="wss://"):
        connect_stream("https://example.com/stream", {})


def test_webhook_signature_matches_twilio_reference_algorithm() -> None:
    checker = SignatureChecker("secret", "https://phone.example.com")
    params = {"CallSid": "CA1", "From": "+15551234567"}
    good = RequestValidator("secret").compute_signature(
        "https://phone.example.com/voice?x=1", params
    )
    assert checker.check_webhook("/voice", "x=1", params, good) is None
    assert "does not match" in (checker.check_webhook("/voice", "", params, good) or "")
    assert "missing" in (checker.check_webhook("/voice", "x=1", params, None) or "")
    assert checker.check_webhook("/voice", "x=1", {**params, "From": "+1"}, good) is not None


def test_websocket_signature_uses_the_wss_url_without_port() -> None:
    checker = SignatureChecker("secret", "https://phone.example.com")
    good = RequestValidator("secret").compute_signature("wss://phone.example.com/stream", {})
    assert checker.check_websocket("/stream", "", good) is None
    assert checker.check_websocket("/stream", "", "bogus") is not None
    assert websocket_url("https://phone.example.com", "/stream") == "wss://phone.example.com/stream"
    assert websocket_url("http://127.0.0.1:8080", "/stream") == "ws://127.0.0.1:8080/stream"


def test_settings_from_environment() -> None:
    settings = Settings.from_env(
        {
            "TELEPHONY_PORT": "9000",
            "TELEPHONY_PUBLIC_URL": "https://phone.example.com",
            "TWILIO_AUTH_TOKEN": "tok",
            "TELEPHONY_PLAYBACK_LEAD_MS": "300",
        },
        host="0.0.0.0",
    )
    assert (settings.port, settings.host, settings.twilio_auth_token) == (9000, "0.0.0.0", "tok")
    assert settings.playback_lead_ms == 300
    assert Settings.from_env({"PORT": "5000"}).port == 5000


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TELEPHONY_PORT": "eighty"}, "TELEPHONY_PORT must be a number"),
        ({"TELEPHONY_PORT": "0"}, "TELEPHONY_PORT must be 1-65535"),
        ({"TELEPHONY_PUBLIC_URL": "phone.example.com"}, "https://host"),
        ({"TELEPHONY_PUBLIC_URL": "https://x.com/voice"}, "bare origin"),
        ({"TELEPHONY_BARGE_IN_FRAMES": "9"}, "BARGE_IN_FRAMES"),
        ({"TELEPHONY_PLAYBACK_LEAD_MS": "10"}, "PLAYBACK_LEAD_MS"),
        ({"TELEPHONY_CALLER_SILENCE_MS": "0"}, "CALLER_SILENCE_MS must be at least 100"),
        ({"TELEPHONY_BARGE_IN_MIN_SPEECH_MS": "-1"}, "BARGE_IN_MIN_SPEECH_MS"),
        ({"TELEPHONY_BARGE_IN_RESUME_MS": "0"}, "BARGE_IN_RESUME_MS must be 20-600"),
        ({"TELEPHONY_KEYS_IDLE_S": "0"}, "KEYS_IDLE_S must be positive"),
        ({"TELEPHONY_MODEL_CONNECTIONS_PER_MINUTE": "0"}, "CONNECTIONS_PER_MINUTE must be"),
        ({"TELEPHONY_DRAIN_S": "-1"}, "DRAIN_S"),
        ({"TELEPHONY_STREAM_CONNECT_TIMEOUT_S": "0"}, "STREAM_CONNECT_TIMEOUT_S"),
        ({"TELEPHONY_LOG_LEVEL": "LOUD"}, "TELEPHONY_LOG_LEVEL must be DEBUG"),
        ({"TELEPHONY_MODEL_STALL_S": "nan"}, "TELEPHONY_MODEL_STALL_S must be a number"),
    ],
)
def test_settings_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)
