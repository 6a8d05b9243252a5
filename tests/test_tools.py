"""Call tools: ADK's LiveKit names, offered on phone calls only."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from telephony.call.tools import PhoneToolset, end_call, register


def _tools(state: dict[str, Any]) -> list[str]:
    context: Any = SimpleNamespace(state=state)
    return [tool.name for tool in asyncio.run(PhoneToolset().get_tools(context))]


def test_the_tools_are_offered_on_phone_calls_only() -> None:
    assert _tools({"telephony_call_sid": "CA1"}) == ["end_call"]
    assert _tools({}) == []  # `adk web`: no call to act on


def test_end_call_finds_its_call_by_session_or_says_there_is_none() -> None:
    ended: list[str] = []

    class Call:
        def end_after_reply(self) -> None:
            ended.append("CA1")

    context: Any = SimpleNamespace(session=SimpleNamespace(id="CA1"))
    assert asyncio.run(end_call(context)) == "There is no phone call to end."
    register("CA1", Call())
    try:
        assert "ending" in asyncio.run(end_call(context))
    finally:
        register("CA1", None)
    assert ended == ["CA1"]
