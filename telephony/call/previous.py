"""What a caller said on earlier calls, for the agent of their next one (on any instance that
shares the session store).

Sessions are keyed by the caller's number (user id) and the call SID (session id), so a new
call's session starts empty of what the caller said before. When a call's session is created,
the last few calls of the same number are summed up, bounded, in ADK user state: an
instruction says `{user:telephony_previous_calls?}` to see them. Numbers that are not a
caller's own (withheld, anonymous) get none: their calls are strangers'.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.adk.sessions import BaseSessionService, Session
from google.adk.sessions.base_session_service import GetSessionConfig

__all__ = [
    "MAX_CALLS",
    "MAX_LINES",
    "PREVIOUS_CALLS_KEY",
    "STARTED_KEY",
    "previous_calls",
    "summary",
]

PREVIOUS_CALLS_KEY = "user:telephony_previous_calls"
"""Session state key (user-scoped: shared by the caller's sessions) of the summary."""
STARTED_KEY = "telephony_started_at"
"""Session state key: when the call's session was created (seconds since the epoch)."""
MAX_CALLS = 3
"""Earlier calls summed up by default, the latest ones."""
MAX_LINES = 6
"""Transcript lines kept of each, its last ones."""
MAX_LINE_CHARS = 200
RECENT_EVENTS = 200
"""Events read of each earlier call: enough for its last lines, bounded for long calls."""
_WITHHELD = frozenset({"", "unknown", "anonymous", "restricted", "private", "+266696687"})
"""What Twilio and carriers put in `From` when the caller's number is withheld
(+266696687 is the number Twilio shows for anonymous callers)."""


async def previous_calls(
    sessions: BaseSessionService,
    *,
    app_name: str,
    user_id: str,
    session_id: str,
    limit: int = MAX_CALLS,
) -> str:
    """The summary of the caller's latest `limit` calls before `session_id` (empty: none, or
    a withheld number)."""
    if user_id.strip().lower() in _WITHHELD:
        return ""
    listed = await sessions.list_sessions(app_name=app_name, user_id=user_id)
    earlier = sorted(
        (s for s in listed.sessions if s.id != session_id), key=lambda s: s.last_update_time
    )[-limit:]
    config = GetSessionConfig(num_recent_events=RECENT_EVENTS)
    calls = []
    for listed_call in earlier:
        call = await sessions.get_session(
            app_name=app_name, user_id=user_id, session_id=listed_call.id, config=config
        )
        if call is not None:
            calls.append(call)
    return summary(calls)


def summary(calls: list[Session]) -> str:
    """Calls, oldest first: when each began and how long it went on, then its last lines."""
    if not calls:
        return ""
    parts = ["Earlier calls from this number (oldest first):"]
    for call in calls:
        started = call.state.get(STARTED_KEY)
        if not isinstance(started, int | float):  # a session from before the key was kept
            started = call.events[0].timestamp if call.events else call.last_update_time
        when = datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%d %H:%M UTC")
        parts.append(f"- {when}, {_duration(call.last_update_time - started)}:")
        parts += [f"  {line}" for line in _lines(call)[-MAX_LINES:]] or ["  (nothing said)"]
    return "\n".join(parts)


def _lines(call: Session) -> list[str]:
    lines = []
    for event in call.events:
        for who, heard in (
            ("caller", event.input_transcription),
            ("agent", event.output_transcription),
        ):
            text = " ".join((heard.text or "").split()) if heard else ""
            if text:
                cut = text if len(text) <= MAX_LINE_CHARS else text[: MAX_LINE_CHARS - 1] + "…"
                lines.append(f"{who}: {cut}")
    return lines


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
