"""Choosing the agent: echo, the built-in Gemini agent, or a user's folder in the adk web layout."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.genai import types

from telephony.agents import AgentLoadError, load_agent
from telephony.cli import main
from telephony.settings import Settings

AGENT_PY = """
from google.adk.agents import LlmAgent
from telephony.agents.echo import EchoLlm

root_agent = LlmAgent(name="my_agent", model=EchoLlm(), instruction="Be brief.")
"""


def test_builtin_gemini_agent_is_configured_for_phones() -> None:
    spec = load_agent("", Settings(model="gemini-test-model", voice="Puck"))
    assert spec.app.root_agent.model == "gemini-test-model"  # type: ignore[union-attr]
    assert spec.greeting
    config = spec.run_config
    assert config.response_modalities == [types.Modality.AUDIO]
    assert config.input_audio_transcription and config.output_audio_transcription
    assert config.session_resumption is not None
    assert config.context_window_compression is not None
    assert config.speech_config.voice_config.prebuilt_voice_config.voice_name == "Puck"  # type: ignore[union-attr]


def test_echo_agent_greets_by_itself() -> None:
    spec = load_agent("echo", Settings())
    assert spec.app.name == "echo" and spec.greeting is None


def test_loads_a_user_agent_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my_agent"
    folder.mkdir()
    (folder / "agent.py").write_text(AGENT_PY)
    spec = load_agent(str(folder), Settings())
    assert spec.app.name == "my_agent"
    assert spec.app.root_agent.name == "my_agent"  # type: ignore[union-attr]


def test_bad_agent_folders_get_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(AgentLoadError, match="does not exist"):
        load_agent(str(tmp_path / "missing"), Settings())
    (tmp_path / "empty").mkdir()
    with pytest.raises(AgentLoadError, match="no agent.py"):
        load_agent(str(tmp_path / "empty"), Settings())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "agent.py").write_text("raise ValueError('boom')\n")
    with pytest.raises(AgentLoadError, match="could not load"):
        load_agent(str(broken), Settings())
    assert main(["serve", str(tmp_path / "missing"), "--session-db", str(tmp_path / "s.db")]) == 2
    assert "does not exist" in capsys.readouterr().err
