"""Tools an agent holds to act on the phone call it is on.

Names, arguments and meaning follow ADK's own LiveKit bridge (`google.adk.integrations.
livekit`), so one agent works on both transports. The toolset offers them only inside a phone
call (its session state has `telephony_call_sid`), so the same agent still runs under
`adk web`. A tool finds its call by the session id, which is the call SID.

The docstrings of the tool functions are what the model reads.
"""

from __future__ import annotations

import logging
from typing import Protocol

from google.adk.agents.readonly_context import ReadonlyContext
from google.adk.tools import BaseTool, FunctionTool, ToolContext
from google.adk.tools.base_toolset import BaseToolset

__all__ = ["CallControl", "PhoneToolset", "end_call", "register"]

log = logging.getLogger(__name__)


class CallControl(Protocol):
    """What the tools need of a call."""

    def end_after_reply(self) -> None:
        """Hang up once the caller has heard what the agent says now."""


_calls: dict[str, CallControl] = {}
"""The calls this process serves, by call SID (= ADK session id)."""


def register(call_sid: str, call: CallControl | None) -> None:
    """A call makes itself known to its tools when it starts (None: it ended)."""
    if call is None:
        _calls.pop(call_sid, None)
    else:
        _calls[call_sid] = call


async def end_call(tool_context: ToolContext) -> str:
    """Hangs up and ends the conversation.

    Call this once the caller has said goodbye or their request is resolved. Say your
    goodbye before or right after calling it: the call ends once the caller has heard it.

    Returns:
      A confirmation that the call is ending.
    """
    call = _calls.get(tool_context.session.id)
    if call is None:
        return "There is no phone call to end."
    log.info("call %s: the agent ends the call", tool_context.session.id)
    call.end_after_reply()
    return "The call is ending once the caller has heard your goodbye."


class PhoneToolset(BaseToolset):
    """`end_call`, on phone calls only."""

    async def get_tools(self, readonly_context: ReadonlyContext | None = None) -> list[BaseTool]:
        if readonly_context is None or not readonly_context.state.get("telephony_call_sid"):
            return []
        return [FunctionTool(end_call)]

    async def close(self) -> None:
        """Holds nothing to release."""
