"""The built-in phone agent: a Gemini native-audio live model with a phone manner."""

from __future__ import annotations

from google.adk.agents import LlmAgent
from google.adk.apps import App

from ..call.tools import PhoneToolset

__all__ = ["EARLIER_CALLS", "PHONE_INSTRUCTION", "gemini_app"]

PHONE_INSTRUCTION = """\
You are a friendly, efficient assistant answering a phone call.
Speak the way people speak on the phone: short sentences, one idea at a time, no lists,
no markdown, no emoji, and never read out URLs or long numbers unless asked.
Start by greeting the caller in one short sentence and asking how you can help.
If you did not catch something, say so and ask again. If the caller interrupts you, stop
and listen. Keep answers brief unless the caller asks for detail.
When the caller says goodbye or has nothing more to ask, say a short goodbye and call
end_call."""
EARLIER_CALLS = """
If notes of this caller's earlier calls follow, use them when they help (the caller may be
calling back about the same thing), but do not read them out.
{user:telephony_previous_calls?}"""
"""Last in the instruction: what the caller said on their latest calls (see
`telephony.call.previous`), empty on a first call."""


def gemini_app(model: str, transfer_to: str = "") -> App:
    """`transfer_to`: where a caller who asks for a person is sent (none: nowhere)."""
    instruction = PHONE_INSTRUCTION
    if transfer_to:
        instruction += (
            "\nIf the caller asks for a person, or you cannot help them, tell them you are "
            f"transferring them, then call transfer_call with transfer_to {transfer_to}."
        )
    instruction += EARLIER_CALLS
    agent = LlmAgent(
        name="phone_agent", model=model, instruction=instruction, tools=[PhoneToolset()]
    )
    return App(name="phone_agent", root_agent=agent)
