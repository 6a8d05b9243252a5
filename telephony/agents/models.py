"""Live model names and what differs between model families: the one place that knows.

Model names churn and the two backends serve different ones, so the default follows the
backend the user configured the way google-genai picks it (`GOOGLE_GENAI_USE_ENTERPRISE`, else
`GOOGLE_GENAI_USE_VERTEXAI`). Per-family setup differences that ADK 2.13 already handles
(3.x models reject `proactivity: {proactiveAudio: false}` and drop `enable_affective_dialog`:
ADK leaves both out for them and sends their text turns as realtime text) need nothing from
us; the tests that run the phone setup of both families through the Gemini stand-in catch an
ADK that stops doing so.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["GEMINI_API_MODEL", "VERTEX_MODEL", "default_model", "uses_vertex"]

GEMINI_API_MODEL = "gemini-3.8-live"
"""The current stable live model on the Gemini API (September 2026)."""
VERTEX_MODEL = "gemini-live-2.5-flash-native-audio"
"""The live model Vertex AI serves."""


def uses_vertex(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    flag = env.get("GOOGLE_GENAI_USE_ENTERPRISE", env.get("GOOGLE_GENAI_USE_VERTEXAI", ""))
    return flag.lower() in ("true", "1")


def default_model(environ: Mapping[str, str] | None = None) -> str:
    return VERTEX_MODEL if uses_vertex(environ) else GEMINI_API_MODEL
