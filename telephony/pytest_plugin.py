"""pytest fixtures for replaying recorded calls against your agent (registered as a pytest
plugin when telephony is installed).

    def test_my_agent_still_handles_barge_in(call_replay):
        result = call_replay("calls/barge_in.jsonl.gz", agent="path/to/my_agent")
        assert result.differences() == []
        assert len(result.figures.clears) == 1
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .replay import ReplayResult, replay_in_process

__all__ = ["call_replay"]


@pytest.fixture
def call_replay() -> Callable[..., ReplayResult]:
    """`call_replay(recording, agent="echo", **settings)`: see `replay_in_process`."""
    return replay_in_process
