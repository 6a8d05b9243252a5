"""Tools an agent holds to act on the phone call it is on.

Names, arguments and meaning follow ADK's own LiveKit bridge (`google.adk.integrations.
livekit`), so one agent works on both transports. The toolset offers them only inside a phone
call (its session state has `telephony_call_sid`), so the same agent still runs under
`adk web`. A tool finds its call by the session id, which is the call SID.

The docstrings of the tool functions are what the model reads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from google.adk.agents.readonly_context import ReadonlyContext
from google.adk.tools import BaseTool, FunctionTool, ToolContext
from google.adk.tools.base_toolset import BaseToolset

from ..twilio.targets import TargetError

__all__ = [
    "CallControl",
    "PhoneToolset",
    "end_call",
    "register",
    "send_dtmf",
    "transfer_call",
    "unregister",
]

log = logging.getLogger(__name__)


class CallControl(Protocol):
    """What the tools need of a call (`Call`). Each acts once the caller has heard what the
    agent says now; the last two raise `TargetError` with a reason the model can relay."""

    @property
    def transfers_allowed(self) -> bool: ...

    def end_after_reply(self) -> None: ...

    def transfer(self, target: str) -> str: ...

    def press_keys(self, digits: str) -> str: ...


_calls: dict[str, CallControl] = {}
"""The calls this process serves, by call SID (= ADK session id)."""


def register(call_sid: str, call: CallControl) -> None:
    """A call makes itself known to its tools when it starts."""
    _calls[call_sid] = call


def unregister(call_sid: str, call: CallControl) -> None:
    """The call ended (a newer call under the same SID keeps its tools)."""
    if _calls.get(call_sid) is call:
        del _calls[call_sid]


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


async def transfer_call(transfer_to: str, tool_context: ToolContext) -> str:
    """Transfers the caller to another phone number or SIP address.

    Only works on a phone call. Tell the caller they are being transferred before calling
    this: once they have heard you, they are connected and your conversation ends.

    Args:
      transfer_to: Where to send the caller, as a phone number in E.164 form (for example
        `+15105550100`) or a full SIP URI.

    Returns:
      A confirmation, or an explanation of why the transfer could not happen.
    """
    return _with_call(
        tool_context,
        "Could not transfer the call",
        lambda call: (
            f"Transferring the caller to {call.transfer(transfer_to)} once they have heard you."
        ),
    )


async def send_dtmf(digits: str, tool_context: ToolContext) -> str:
    """Presses keys on the phone keypad, to drive an automated phone menu.

    The keys are pressed once what you are saying now has been heard; then you hear the
    menu's answer.

    Args:
      digits: The keys to press, in order, for example `"1"` or `"1234#"` (`w` waits half a
        second).

    Returns:
      A confirmation of what was sent, or why it could not be.
    """
    return _with_call(
        tool_context,
        "Could not press the keys",
        lambda call: f"Sent the tones {call.press_keys(digits)}.",
    )


def _with_call(tool_context: ToolContext, failed: str, act: Callable[[CallControl], str]) -> str:
    """Runs `act` on the tool's call; a refusal comes back as `failed`, and why."""
    call = _calls.get(tool_context.session.id)
    if call is None:
        return f"{failed}: this is not a phone call."
    try:
        return act(call)
    except TargetError as exc:
        log.info("call %s: %s: %s", tool_context.session.id, failed.lower(), exc)
        return f"{failed}: {exc}."


class PhoneToolset(BaseToolset):
    """`end_call` and `send_dtmf` on phone calls, and `transfer_call` where the call may
    transfer (see `TELEPHONY_TRANSFER_ALLOW`); nothing elsewhere."""

    async def get_tools(self, readonly_context: ReadonlyContext | None = None) -> list[BaseTool]:
        sid = readonly_context.state.get("telephony_call_sid") if readonly_context else None
        call = _calls.get(sid) if sid else None
        if call is None:
            return []
        tools = [end_call, send_dtmf] + ([transfer_call] if call.transfers_allowed else [])
        return [FunctionTool(tool) for tool in tools]

    async def close(self) -> None:
        """Holds nothing to release."""
