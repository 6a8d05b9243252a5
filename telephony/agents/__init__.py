"""Which ADK agent answers the phone, and how its live session is configured."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from google.adk.agents import BaseAgent
from google.adk.agents.run_config import RunConfig, StreamingMode
from google.adk.apps import App
from google.genai import types

from ..settings import Settings

__all__ = ["AgentLoadError", "AgentSpec", "load_agent", "phone_run_config", "warm_up"]


class AgentLoadError(ValueError):
    """The AGENT argument names nothing that can answer a call."""


@dataclass(frozen=True)
class AgentSpec:
    app: App
    run_config: RunConfig
    greeting: str | None
    """Text turn sent when the call connects so the agent speaks first (None: it already does)."""


def phone_run_config(settings: Settings) -> RunConfig:
    speech = None
    if settings.voice or settings.language:
        speech = types.SpeechConfig(
            voice_config=types.VoiceConfig(
                prebuilt_voice_config=types.PrebuiltVoiceConfig(voice_name=settings.voice)
            )
            if settings.voice
            else None,
            language_code=settings.language or None,
        )
    return RunConfig(
        streaming_mode=StreamingMode.BIDI,
        response_modalities=[types.Modality.AUDIO],
        speech_config=speech,
        input_audio_transcription=types.AudioTranscriptionConfig(),
        output_audio_transcription=types.AudioTranscriptionConfig(),
        session_resumption=types.SessionResumptionConfig(),
        context_window_compression=types.ContextWindowCompressionConfig(
            sliding_window=types.SlidingWindow()
        ),
    )


def load_agent(name: str, settings: Settings) -> AgentSpec:
    """`echo`, a folder in the `adk web` layout, or "" for the built-in Gemini agent."""
    run_config = phone_run_config(settings)
    greeting = settings.greeting or None
    if name == "echo":
        from .echo import echo_app

        return AgentSpec(echo_app(), run_config, greeting=None)
    if not name:
        from .gemini import gemini_app
        from .models import default_model

        app = gemini_app(settings.model or default_model(), settings.transfer_to)
        return AgentSpec(app, run_config, greeting)
    return AgentSpec(_load_folder(Path(name)), run_config, greeting)


def _load_folder(path: Path) -> App:
    """Loads `path/agent.py` (`root_agent` or `app`) the way `adk web` does.

    ADK's AgentLoader is not a documented public API; this is the one place that touches it.
    """
    from google.adk.cli.utils.agent_loader import AgentLoader

    path = path.resolve()
    if not path.is_dir():
        raise AgentLoadError(f"agent folder {path} does not exist (or use `echo`)")
    if not (path / "agent.py").is_file() and not (path / "__init__.py").is_file():
        raise AgentLoadError(f"{path} has no agent.py: expected the `adk web` layout")
    try:
        loaded = AgentLoader(str(path.parent)).load_agent(path.name)
    except Exception as exc:
        raise AgentLoadError(f"could not load the agent in {path}: {exc}") from exc
    if isinstance(loaded, App):
        return loaded
    if isinstance(loaded, BaseAgent):
        return App(name=path.name, root_agent=loaded)
    raise AgentLoadError(f"{path} defines neither root_agent nor app, got {type(loaded)}")


async def warm_up(run_config: RunConfig) -> None:
    """Runs one throwaway offline live session so the first caller does not wait for the
    modules ADK imports lazily on its first `run_live` (about half a second).

    Then it freezes the heap: what exists now lives as long as the server, and without the
    freeze every full garbage collection scans it all, a 100+ ms pause for every call's audio.
    """
    from google.adk.agents.live_request_queue import LiveRequestQueue
    from google.adk.runners import Runner
    from google.adk.sessions import InMemorySessionService

    from .echo import echo_app

    runner = Runner(
        app=echo_app(), session_service=InMemorySessionService(), auto_create_session=True
    )
    queue = LiveRequestQueue()
    async for _ in runner.run_live(
        user_id="warm-up", session_id="warm-up", live_request_queue=queue, run_config=run_config
    ):
        queue.close()
        break
    gc.collect()
    gc.freeze()
