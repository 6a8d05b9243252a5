"""What a call keeps in its ADK session beside ADK's own events, for its history.

ADK stores the transcript (finished transcriptions of both sides), text turns, tool calls and
their results, and `interrupted` / `turn_complete`. The history also needs what only the
bridge knows. Each such fact is one session event through `CallRecord.event`: author
`telephony`, no content (so ADK never puts it in the model's context), and
`custom_metadata = {"telephony_KIND": {...fields}}`:

- `telephony_barge_in` `{source}`: the caller talked over the agent; its audio was cleared.
- `telephony_keys` `{digits}`: the caller's key presses, as the one turn the model got.
- `telephony_reconnect` `{restarts, reconnects}`: a new live connection: ADK's own (its
  `reconnects` went up) or the bridge's restart of the live session (`restarts` too).
- `telephony_status`: a Twilio status callback: those of `CallStatus`, `StreamEvent`,
  `StreamError`, `CallDuration`, `AnsweredBy` it carried (Twilio's names and values).
- `telephony_end` `{outcome, reason, duration_s, direction, transfer_to}`: the bridge let
  the call go (`outcome`: the call's `Outcome`; `transfer_to` only for a transfer).

The heard-notes (`telephony_note`, see `supervisor.send_note`) are user events with content.
The end record also updates the session state, so a list of calls needs no events: see
`END_STATE`. The call's start is in the state from the first turn (`telephony_started_at`).

Events are rare (a few per call): each is made when it happens (its timestamp) and appended
behind the call's hot path, in order, on the session object the live run appends to (a
second copy of the session would be stale to a database that checks). Before the live run
has a session object, events wait; `close` appends whatever is left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from google.adk.events import Event, EventActions
from google.adk.sessions import BaseSessionService, Session

__all__ = [
    "AUTHOR",
    "END_STATE",
    "STATUS_FIELDS",
    "CallRecord",
    "end_event",
    "record_event",
    "status_event",
    "status_fields",
]

log = logging.getLogger(__name__)

AUTHOR = "telephony"
"""The author of the bridge's own events (never the agent's name, nor `user`)."""
STATUS_FIELDS = ("CallStatus", "StreamEvent", "StreamError", "CallDuration", "AnsweredBy")
"""What of a Twilio status callback is kept (the rest is the same for every callback)."""
END_STATE = (
    "telephony_outcome",
    "telephony_end_reason",
    "telephony_ended_at",
    "telephony_duration_s",
    "telephony_turns",
    "telephony_transfer_to",
)
"""Session state keys the end record sets (`telephony_transfer_to` only for a transfer);
status callbacks set `telephony_call_status` and, with the call's end, Twilio's
`telephony_call_duration_s`."""


def status_fields(form: Mapping[str, str]) -> dict[str, str]:
    """The part of a status callback's form worth keeping."""
    return {k: form[k] for k in STATUS_FIELDS if form.get(k)}


def record_event(
    kind: str, fields: Mapping[str, Any], *, state: Mapping[str, Any] | None = None
) -> Event:
    """One fact for the history (see the module's table), stamped now."""
    return Event(
        author=AUTHOR,
        custom_metadata={f"telephony_{kind}": dict(fields)},
        actions=EventActions(state_delta=dict(state or {})),
    )


def end_event(
    outcome: str,
    reason: str,
    *,
    started_at: float,
    direction: str,
    turns: int = 0,
    transfer_to: str = "",
) -> Event:
    """How a call ended, with the summary a list of calls shows (`END_STATE`)."""
    now = time.time()
    duration = round(max(0.0, now - started_at), 1)
    outcome = str(outcome)  # the call's `Outcome`, or Twilio's word for an unanswered call
    fields: dict[str, Any] = {"outcome": outcome, "reason": reason, "duration_s": duration}
    fields["direction"] = direction
    state: dict[str, Any] = {
        "telephony_outcome": outcome,
        "telephony_end_reason": reason,
        "telephony_ended_at": now,
        "telephony_duration_s": duration,
        "telephony_turns": turns,
    }
    if transfer_to:
        fields["transfer_to"] = state["telephony_transfer_to"] = transfer_to
    return record_event("end", fields, state=state)


def status_event(fields: Mapping[str, str]) -> Event:
    """A status callback's fact (see `status_fields`), with what it changes in the state."""
    return record_event("status", fields, state=_status_state(fields))


def _status_state(fields: Mapping[str, str]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if status := fields.get("CallStatus"):
        state["telephony_call_status"] = status
    if (duration := fields.get("CallDuration", "")).isdigit():
        state["telephony_call_duration_s"] = int(duration)
    return state


class CallRecord:
    """One call's facts, appended to its session in order, off the hot path."""

    def __init__(
        self,
        session: Callable[[], tuple[BaseSessionService, Session] | None],
        *,
        call_sid: str,
    ) -> None:
        """`session` gives the session object the live run appends to, once there is one."""
        self._session = session
        self._sid = call_sid
        self._waiting: list[Event] = []
        self._writing: asyncio.Task[None] | None = None
        self._closed_on: tuple[BaseSessionService, Session] | None = None
        """The session `close` found, for facts that come later (Twilio's last callbacks)."""
        self.turns = 0
        """The caller's finished utterances and the agent's replies so far."""
        self.started_at = time.time()
        self.lost = 0

    def event(self, kind: str, **fields: Any) -> None:
        self.append(record_event(kind, fields))

    def append(self, event: Event) -> None:
        """Appends `event` once the session is at hand, after every event before it."""
        self._waiting.append(event)
        if self._at_hand() is not None and (self._writing is None or self._writing.done()):
            self._writing = asyncio.create_task(self._write())

    def end(self, reason: str, outcome: str, direction: str, transfer_to: str = "") -> None:
        """The bridge let the call go: how, and the summary a list of calls shows."""
        self.append(
            end_event(
                outcome,
                reason,
                started_at=self.started_at,
                direction=direction,
                turns=self.turns,
                transfer_to=transfer_to,
            )
        )

    async def close(self, fallback: Callable[[], Any]) -> None:
        """Appends what is left; without a live session object, on the one `fallback` (an
        awaitable of a `(service, session)` or None) finds."""
        if self._writing is not None:
            await asyncio.wait({self._writing})
        if not self._waiting:
            return
        try:
            at_hand = self._at_hand() or await fallback()
        except Exception as exc:  # the call still ends; its history is what is lost
            at_hand = None
            self._lost(0, f"its session could not be read: {exc!r}")
        self._closed_on = at_hand
        if at_hand is None:
            self._lost(len(self._waiting), "the call has no session")
            self._waiting.clear()
            return
        await self._write(at_hand)

    async def _write(self, at_hand: tuple[BaseSessionService, Session] | None = None) -> None:
        while self._waiting and (at_hand := at_hand or self._at_hand()) is not None:
            service, session = at_hand
            event = self._waiting.pop(0)
            try:
                await service.append_event(session=session, event=event)
            except Exception as exc:  # the call goes on; only this fact of its history is lost
                self._lost(1, repr(exc))

    def _at_hand(self) -> tuple[BaseSessionService, Session] | None:
        return self._session() or self._closed_on

    def _lost(self, n: int, why: str) -> None:
        self.lost += n
        log.error("call %s: %d event(s) of its history not stored: %s", self._sid, n, why)
