"""Call history: facts that reach a call's session after the call is gone, and the calls as
a person reads them (`telephony calls list` / `show`).

Everything is read from an ADK session service, whichever backs the server. A list reads
session state only (ADK's `list_sessions` returns no events): the call's facts from its
first turn (`telephony_*`, see `CallInfo.state`) and the summary its end record set
(`record.END_STATE`). Only `show` reads a call's events.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from google.adk.events import Event
from google.adk.sessions import BaseSessionService, Session
from google.adk.sessions.base_session_service import GetSessionConfig

from ..call import CallInfo, Outcome
from ..call.logs import mask_number
from ..call.record import end_event

__all__ = [
    "BadQuery",
    "CallSummary",
    "HistoryError",
    "find_call",
    "format_call",
    "format_summary",
    "list_calls",
    "parse_since",
    "store_late",
    "store_unstarted",
]

log = logging.getLogger(__name__)

OUTCOME_TEXT: dict[str, str] = {
    Outcome.HUNG_UP: "caller hung up",
    Outcome.AGENT_ENDED: "agent ended the call",
    Outcome.TRANSFERRED: "transferred",
    Outcome.TIME_LIMIT: "time limit",
    Outcome.CALLER_IDLE: "caller silent",
    Outcome.FAX: "fax answered",
    Outcome.MODEL_FAILED: "model failed",
    Outcome.STREAM_ERROR: "stream error",
    Outcome.NO_STREAM: "no media stream",
    Outcome.SHUTDOWN: "server shut down",
    Outcome.INTERNAL_ERROR: "internal error",
    Outcome.REFUSED: "turned away (busy message)",
    "busy": "line busy",
    "no-answer": "not answered",
    "failed": "call failed",
    "canceled": "call canceled",
}
"""How a call ended, by its `Outcome` (or Twilio's final status, for an outbound call that
never reached the agent)."""


class HistoryError(ValueError):
    """A question the history cannot answer (an unknown call)."""


class BadQuery(HistoryError):
    """A question put wrongly (a time that is none, a negative limit)."""


@dataclass(frozen=True)
class CallSummary:
    """A call as its session state tells it."""

    call_sid: str
    caller: str
    called: str
    direction: str
    started_at: float | None
    duration_s: float | None
    """Twilio's `CallDuration` once reported, else the bridge's own."""
    outcome: str
    """An `OUTCOME_TEXT` key, or "" without an end record (in progress, or cut off)."""
    transfer_to: str
    turns: int | None
    call_status: str
    """The last `CallStatus` Twilio reported ("" if none)."""

    @classmethod
    def of(cls, session: Session) -> CallSummary | None:
        """None for a session that is not a phone call's."""
        state = session.state
        if "telephony_call_sid" not in state:
            return None
        duration = state.get("telephony_call_duration_s", state.get("telephony_duration_s"))
        # calls kept before their start was: their last change tells the day at least
        started = state.get("telephony_started_at", session.last_update_time or None)
        return cls(
            call_sid=session.id,
            caller=str(state.get("telephony_caller", "")),
            called=str(state.get("telephony_called", "")),
            direction=str(state.get("telephony_direction", "")),
            started_at=float(started) if started is not None else None,
            duration_s=float(duration) if duration is not None else None,
            outcome=str(state.get("telephony_outcome", "")),
            transfer_to=str(state.get("telephony_transfer_to", "")),
            turns=state.get("telephony_turns"),
            call_status=str(state.get("telephony_call_status", "")),
        )

    @property
    def outbound(self) -> bool:
        return self.direction.startswith("outbound")

    @property
    def party(self) -> str:
        """Who the call was with: the caller, or the number an outbound call called."""
        return self.called if self.outbound else self.caller

    def ended(self, mask: bool = False) -> str:
        """How the call ended, in words."""
        if not self.outcome:
            return "no end record (in progress, or the server stopped)"
        text = OUTCOME_TEXT.get(self.outcome, self.outcome)
        if self.transfer_to:
            text += f" to {_number(self.transfer_to, mask)}"
        return text


_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """`2h`, `3d`, `90m`, `1w` (that long ago), or an ISO date or date and time (local time
    unless it says otherwise). Returns a Unix time."""
    now = time.time() if now is None else now
    if match := _RELATIVE.fullmatch(text.strip()):
        return now - float(match[1]) * _UNITS[match[2]]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadQuery(
            f"--since {text!r}: expected a time ago (30m, 2h, 3d, 1w) or an ISO date/time "
            "(2026-11-30, 2026-11-30T14:00)"
        ) from None
    return (when if when.tzinfo else when.astimezone()).timestamp()


async def list_calls(
    sessions: BaseSessionService,
    app_name: str,
    *,
    since: float | None = None,
    caller: str = "",
    limit: int = 50,
) -> list[CallSummary]:
    """The latest calls first; `caller` matches who the call was with (`party`) by the
    digits (or a SIP URI by its text), anywhere in the number."""
    listed = await sessions.list_sessions(app_name=app_name)
    calls = [c for s in listed.sessions if (c := CallSummary.of(s)) is not None]
    if since is not None:
        calls = [c for c in calls if c.started_at is not None and c.started_at >= since]
    if caller:
        calls = [c for c in calls if _matches(caller, c.party)]
    calls.sort(key=lambda c: c.started_at or 0.0, reverse=True)
    return calls[:limit] if limit > 0 else calls


def _matches(wanted: str, number: str) -> bool:
    digits = re.sub(r"\D", "", wanted)
    if digits and not re.search(r"[a-zA-Z@]", wanted):
        return digits in re.sub(r"\D", "", number)
    return wanted.lower() in number.lower()


async def find_call(sessions: BaseSessionService, app_name: str, call_sid: str) -> Session:
    """A call's session with its events (the session id is the call SID; the user id, the
    caller, is looked up in the state-only list)."""
    listed = await sessions.list_sessions(app_name=app_name)
    user = next((s.user_id for s in listed.sessions if s.id == call_sid), None)
    session = None
    if user is not None:
        session = await sessions.get_session(app_name=app_name, user_id=user, session_id=call_sid)
    if session is None:
        raise HistoryError(f"no call {call_sid} in the session store (app {app_name!r})")
    return session


async def store_late(
    sessions: BaseSessionService, app_name: str, call_sid: str, user_id: str, event: Event
) -> bool:
    """A fact (a status callback) for a call no longer here: appended to its stored session.
    False when there is none to append to."""
    session = None
    if user_id:
        session = await sessions.get_session(
            app_name=app_name,
            user_id=user_id,
            session_id=call_sid,
            config=GetSessionConfig(num_recent_events=0),
        )
    if session is None:
        return False
    await sessions.append_event(session=session, event=event)
    return True


async def store_unstarted(
    sessions: BaseSessionService,
    app_name: str,
    info: CallInfo,
    events: Iterable[Event],
    *,
    outcome: str,
    reason: str,
) -> None:
    """The history of a call that never reached an agent (turned away busy, an outbound call
    not answered): a session of its own, with what is known and how it ended. A call that has
    its session already (turned away, then Twilio's last callbacks) gets the events added."""
    kept = list(events)
    started_at = kept[0].timestamp if kept else time.time()
    key = {"app_name": app_name, "user_id": info.caller or "unknown", "session_id": info.call_sid}
    latest = GetSessionConfig(num_recent_events=1)
    session = await sessions.get_session(**key, config=latest)
    if session is None:
        state = {**info.state(), "telephony_started_at": started_at}
        try:
            session = await sessions.create_session(**key, state=state)
            kept.append(end_event(outcome, reason, started_at=started_at, direction=info.direction))
        except Exception:  # made meanwhile by this call's other request (turned away, status)
            session = await sessions.get_session(**key, config=latest)
            if session is None:
                raise
    for event in kept:
        await sessions.append_event(session=session, event=event)


def _masked(value: str, mask: bool) -> str:
    """A tool's arguments or result as text, with the phone numbers and key sequences in it
    masked (`+15551234567` -> `+*******4567`, as in the logs)."""
    if not mask:
        return value
    return re.sub(r"[+\d][\d*#wW -]{3,}[\d*#]", lambda m: mask_number(m.group()), value)


def _number(number: str, mask: bool) -> str:
    return mask_number(number) if mask and number else number


def _when(ts: float | None, tz: tzinfo | None) -> str:
    if ts is None:
        return "(unknown time)"
    return datetime.fromtimestamp(ts, tz).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(round(seconds))
    return (
        f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
        if whole >= 3600
        else (f"{whole // 60}:{whole % 60:02d}")
    )


def format_summary(call: CallSummary, *, mask: bool = False, tz: tzinfo | None = None) -> str:
    """One line: when, call SID, who, direction, duration, how it ended, turns."""
    turns = "-" if call.turns is None else f"{call.turns} turn{'s' * (call.turns != 1)}"
    return "  ".join(
        [
            _when(call.started_at, tz),
            call.call_sid,
            f"{_number(call.party, mask) or '(unknown)':<16}",
            f"{call.direction:<13}",
            f"{_duration(call.duration_s):>7}",
            f"{turns:>8}",
            call.ended(mask),
        ]
    )


@dataclass
class _Line:
    at: float
    kind: str
    text: str


def format_call(session: Session, *, mask: bool = False, tz: tzinfo | None = None) -> str:
    """A call's header, then its timeline (times from the call's start): what each side said,
    with what the caller never heard of the agent's words in [not heard: ...], barge-ins,
    key presses, tool calls and results, restarts, Twilio's status callbacks, the end."""
    call = CallSummary.of(session)
    if call is None:
        raise HistoryError(f"session {session.id} is not a phone call")
    events = sorted(session.events, key=lambda e: e.timestamp)
    start = call.started_at or (events[0].timestamp if events else 0.0)
    lines = _timeline(events, mask)
    statuses = [_status_text(r) for e in events if (r := _record(e, "status")) is not None]
    bridged = session.state.get("telephony_duration_s")
    duration = _duration(call.duration_s)
    if bridged is not None and call.duration_s != bridged:
        duration += f" (with the agent {_duration(float(bridged))})"
    header = [
        f"call {call.call_sid}",
        f"  when       {_when(call.started_at, tz)}",
        f"  who        {_number(call.party, mask) or '(unknown)'}",
        f"  {'from' if call.outbound else 'called':<9}  "
        f"{_number(call.caller if call.outbound else call.called, mask) or '(unknown)'}",
        f"  direction  {call.direction}",
        f"  duration   {duration}",
        f"  ended      {call.ended(mask)}",
        f"  status     {', '.join(statuses) if statuses else '(no status callbacks)'}",
        "",
    ]
    body = [f"  {_offset(line.at - start)}  {line.kind:<9} {line.text}" for line in lines]
    return "\n".join(header + body)


def _offset(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{int(seconds // 60):>3}:{seconds % 60:04.1f}"


def _record(event: Event, kind: str) -> dict[str, Any] | None:
    return (event.custom_metadata or {}).get(f"telephony_{kind}")


def _status_text(fields: Mapping[str, Any]) -> str:
    text = str(fields.get("StreamEvent") or fields.get("CallStatus") or "?")
    if duration := fields.get("CallDuration"):
        text += f" after {duration} s"
    if answered := fields.get("AnsweredBy"):
        text += f" (answered by {answered})"
    if error := fields.get("StreamError"):
        text += f" ({error})"
    return text


class _Speaker:
    """One side's transcript as ADK stores it: pieces, then the finished line (its text, or
    none when the pieces are all there is)."""

    def __init__(self, kind: str, lines: list[_Line]) -> None:
        self.kind = kind
        self._lines = lines
        self._pieces = ""
        self._since = 0.0

    def heard(self, at: float, text: str, finished: bool) -> None:
        if not self._pieces:
            self._since = at
        if not finished:
            self._pieces += text
            return
        line, self._pieces = (text or self._pieces).strip(), ""
        if line:
            self._lines.append(_Line(self._since, self.kind, line))

    def flush(self) -> None:
        if text := self._pieces.strip():
            self._lines.append(_Line(self._since, self.kind, text))
        self._pieces = ""


_FACTS = {
    "keys": ("keys", "caller pressed {digits}"),
    "barge_in": ("barge-in", "caller talked over the agent ({source})"),
    "restart": ("restart", "live session restarted (#{restarts})"),
    "reconnect": ("reconnect", "model reconnected (#{reconnects})"),
}
"""How the call's own facts read (see `call.record`), but its status and its end; a
`telephony_reconnect` whose `restarts` went up reads as a restart."""


def _fact(event: Event, restarts: int, mask: bool) -> tuple[str, str] | None:
    for kind in ("keys", "barge_in", "reconnect"):
        if (fields := _record(event, kind)) is not None:
            if kind == "reconnect" and int(fields.get("restarts") or 0) > restarts:
                kind = "restart"
            if kind == "keys" and mask:  # a PIN, an account number: as the logs keep them
                fields = {**fields, "digits": "*" * len(str(fields.get("digits", "")))}
            shown, text = _FACTS[kind]
            return shown, text.format_map(defaultdict(lambda: "?", fields))
    return None


def _timeline(events: list[Event], mask: bool) -> list[_Line]:
    lines: list[_Line] = []
    caller, agent = _Speaker("caller", lines), _Speaker("agent", lines)
    keys, restarts = "", 0
    for event in events:
        at = event.timestamp
        if (said := event.input_transcription) is not None:
            caller.heard(at, said.text or "", bool(said.finished))
        if (said := event.output_transcription) is not None:
            agent.heard(at, said.text or "", bool(said.finished))
        if event.turn_complete or event.interrupted:
            caller.flush()
            agent.flush()
        if (note := _record(event, "note")) is not None:
            _mark_unheard(lines, note)
            continue
        if (pressed := _record(event, "keys")) is not None:
            keys = str(pressed.get("digits", ""))
        if (fact := _fact(event, restarts, mask)) is not None:
            lines.append(_Line(at, *fact))
        if (again := _record(event, "reconnect")) is not None:
            restarts = max(restarts, int(again.get("restarts") or 0))
        if (status := _record(event, "status")) is not None:
            lines.append(_Line(at, "status", f"Twilio: {_status_text(status)}"))
        elif (end := _record(event, "end")) is not None:
            how = OUTCOME_TEXT.get(str(end.get("outcome")), str(end.get("outcome")))
            if target := end.get("transfer_to"):
                how += f" to {_number(str(target), mask)}"
            reason = _masked(str(end.get("reason", "")), mask)
            lines.append(_Line(at, "end", how if how in reason else f"{how}: {reason}"))
        for part in event.content.parts if event.content and event.content.parts else ():
            if part.function_call is not None:
                args = _masked(
                    ", ".join(f"{k}={v!r}" for k, v in (part.function_call.args or {}).items()),
                    mask,
                )
                lines.append(_Line(at, "tool", f"{part.function_call.name}({args})"))
            elif part.function_response is not None:
                result = part.function_response.response or {}
                shown = result.get("result", result) if isinstance(result, dict) else result
                shown = _masked(str(shown), mask)
                lines.append(_Line(at, "result", f"{part.function_response.name}: {shown}"))
            elif part.text and event.author == "user":
                if keys and f"pressed {keys}" in part.text:
                    keys = ""
                    continue
                lines.append(_Line(at, "text", f"to the model: {part.text}"))
    caller.flush()
    agent.flush()
    return lines


def _mark_unheard(lines: list[_Line], note: Mapping[str, Any]) -> None:
    """Marks the part of the agent's last line the caller never heard (a heard-note)."""
    unheard = str(note.get("unheard", ""))
    line = next((line for line in reversed(lines) if line.kind == "agent"), None)
    if line is None:
        return
    if unheard and line.text.endswith(unheard):
        line.text = f"{line.text[: -len(unheard)].rstrip()} [not heard: {unheard}]"
    else:
        line.text += f" [heard {note.get('heard_s')} s of {note.get('generated_s')} s]"


async def calls_text(
    sessions: BaseSessionService,
    app_name: str,
    *,
    call_sid: str = "",
    since: str = "",
    caller: str = "",
    limit: int = 50,
    mask: bool = False,
) -> str:
    """What `telephony calls show CALL_SID` (with `call_sid`) or `calls list` prints."""
    if call_sid:
        return format_call(await find_call(sessions, app_name, call_sid), mask=mask)
    if limit < 0:
        raise BadQuery(f"--limit {limit}: expected 0 (all) or more")
    after = parse_since(since) if since else None
    calls = await list_calls(sessions, app_name, since=after, caller=caller, limit=limit)
    lines = "\n".join(format_summary(c, mask=mask) for c in calls)
    return lines or f"(no calls of the agent {app_name!r}; --agent names another)"
