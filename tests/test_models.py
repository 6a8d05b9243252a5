"""The built-in agent's model follows the backend the user configured."""

from __future__ import annotations

import pytest

from telephony.agents import load_agent
from telephony.agents.models import GEMINI_API_MODEL, VERTEX_MODEL, default_model
from telephony.settings import Settings


@pytest.mark.parametrize(
    ("environ", "model"),
    [
        ({}, GEMINI_API_MODEL),
        ({"GOOGLE_GENAI_USE_VERTEXAI": "false"}, GEMINI_API_MODEL),
        ({"GOOGLE_GENAI_USE_VERTEXAI": "true"}, VERTEX_MODEL),
        ({"GOOGLE_GENAI_USE_VERTEXAI": "1"}, VERTEX_MODEL),
        (
            {"GOOGLE_GENAI_USE_VERTEXAI": "true", "GOOGLE_GENAI_USE_ENTERPRISE": "false"},
            GEMINI_API_MODEL,
        ),
    ],
)
def test_the_default_model_follows_the_backend(environ: dict[str, str], model: str) -> None:
    assert default_model(environ) == model


def test_telephony_model_overrides_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_GENAI_USE_VERTEXAI", "true")
    assert load_agent("", Settings()).app.root_agent.model == VERTEX_MODEL
    assert load_agent("", Settings(model="gemini-x-live")).app.root_agent.model == "gemini-x-live"
