"""pytest fixtures for replaying recorded calls against your agent (registered as a pytest
plugin when telephony is installed).

    def test_my_agent_still_handles_barge_in(call_replay):
        result = call_replay("calls/barge_in.jsonl.gz", agent="path/to/my_agent")
        assert result.differences() == []
        assert len(result.figures.clears) == 1

pytest imports this module in every run of every project where telephony is installed, so it
imports nothing of the product until a test asks for a fixture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .replay import ReplayResult

__all__ = ["call_replay"]


@pytest.fixture
def call_replay() -> Callable[..., ReplayResult]:
    """`call_replay(recording, agent="echo", **settings)`: see `replay_in_process`."""
    from .replay import replay_in_process

    return replay_in_process
