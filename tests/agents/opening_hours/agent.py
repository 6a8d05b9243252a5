"""A user's agent folder (the `adk web` layout) with a tool, on a 2.5 native-audio model."""

from google.adk.agents import LlmAgent


def opening_hours(day: str) -> dict[str, str]:
    """When the restaurant is open on `day`."""
    return {"day": day, "hours": "closed" if day.lower() == "sunday" else "noon to 10 pm"}


root_agent = LlmAgent(
    name="opening_hours",
    model="gemini-2.5-flash-native-audio-preview-12-2025",
    instruction=(
        "You answer the phone for a restaurant. The caller's number is {telephony_caller}. "
        "Use opening_hours when asked."
    ),
    tools=[opening_hours],
)
