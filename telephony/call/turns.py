"""Who holds the floor, and what becomes of the agent's audio: the call's decisions, pure.

The way h11 keeps HTTP apart from sockets, `TurnState` keeps turn-taking apart from tasks,
queues and ADK: the call reports what happened (`handle(event)`) and carries out the actions it
gets back. Every decision about barge-in, discarding an interrupted turn and a model that
stopped answering is made here, so it is tested with values in and values out, and a new
policy (a provisional barge-in, what the caller heard) has one place to live.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AGENT_AUDIO",
    "CLOSING",
    "MODEL_INTERRUPTED",
    "MODEL_TURN_COMPLETE",
    "PLAY",
    "SESSION_RESTARTED",
    "Action",
    "AgentAudio",
    "CallerSpeechEnded",
    "CallerSpeechStarted",
    "Closing",
    "Event",
    "Interrupt",
    "ModelEvent",
    "ModelInterrupted",
    "ModelTurnComplete",
    "Play",
    "RestartModel",
    "SessionRestarted",
    "Tick",
    "TurnState",
]


# Events: what the call saw.


@dataclass(frozen=True, slots=True)
class CallerSpeechStarted:
    """Our VAD heard the caller start talking."""

    at: float
    agent_audible: bool
    """Twilio still holds agent audio the caller has not heard yet."""


@dataclass(frozen=True, slots=True)
class CallerSpeechEnded:
    at: float


@dataclass(frozen=True, slots=True)
class ModelEvent:
    """Anything at all from the live session (it is alive)."""

    at: float


@dataclass(frozen=True, slots=True)
class AgentAudio:
    """A chunk of the agent's voice arrived: play it or drop it?"""


@dataclass(frozen=True, slots=True)
class ModelInterrupted:
    """The model says its own VAD heard the caller over it; its turn is over."""


@dataclass(frozen=True, slots=True)
class ModelTurnComplete:
    pass


@dataclass(frozen=True, slots=True)
class SessionRestarted:
    """A new run_live: whatever the old one was saying is gone."""


@dataclass(frozen=True, slots=True)
class Closing:
    """The call is saying its last words: no agent audio and no barge-in any more."""


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


Event = (
    CallerSpeechStarted
    | CallerSpeechEnded
    | ModelEvent
    | AgentAudio
    | ModelInterrupted
    | ModelTurnComplete
    | SessionRestarted
    | Closing
    | Tick
)

AGENT_AUDIO = AgentAudio()
MODEL_INTERRUPTED = ModelInterrupted()
MODEL_TURN_COMPLETE = ModelTurnComplete()
SESSION_RESTARTED = SessionRestarted()
CLOSING = Closing()


# Actions: what the call must do.


@dataclass(frozen=True, slots=True)
class Interrupt:
    """Stop the caller hearing the agent now: clear Twilio's buffer and what waits to be sent."""

    source: str


@dataclass(frozen=True, slots=True)
class Play:
    """Send this chunk of agent audio to the caller."""


@dataclass(frozen=True, slots=True)
class RestartModel:
    """The live session is alive on paper only: restart it."""

    waited_s: float


Action = Interrupt | Play | RestartModel

PLAY = Play()
_NOTHING: tuple[Action, ...] = ()
_PLAY: tuple[Action, ...] = (PLAY,)


class TurnState:
    """One call's turn-taking, driven by `handle`."""

    def __init__(self, *, stall_s: float) -> None:
        self.stall_s = stall_s
        self.generating = False
        """The model is sending a turn's audio."""
        self.discarding = False
        """The caller cut the model off: the rest of its turn is not played."""
        self.closing = False
        self.awaiting_reply_since: float | None = None
        """When the caller finished speaking to a model that has not answered since."""

    def handle(self, event: Event) -> tuple[Action, ...]:
        match event:
            case AgentAudio():
                if self.discarding or self.closing:
                    return _NOTHING
                self.generating = True
                return _PLAY
            case ModelEvent():
                self.awaiting_reply_since = None
            case CallerSpeechStarted(agent_audible=audible):
                if audible and not self.closing:
                    return self._interrupt("caller speech")
            case CallerSpeechEnded(at=at):
                if self.awaiting_reply_since is None:
                    self.awaiting_reply_since = at
            case ModelInterrupted():
                actions = self._interrupt("model interrupted")
                self._end_turn()
                return actions
            case ModelTurnComplete():
                self._end_turn()
            case SessionRestarted():
                self._end_turn()
                self.awaiting_reply_since = None
            case Closing():
                self.closing = True
            case Tick(now=now):
                since = self.awaiting_reply_since
                if since is not None and now - since >= self.stall_s:
                    self.awaiting_reply_since = None
                    return (RestartModel(now - since),)
        return _NOTHING

    def _interrupt(self, source: str) -> tuple[Action, ...]:
        if self.generating:
            self.discarding = True
        return (Interrupt(source),)

    def _end_turn(self) -> None:
        self.generating = False
        self.discarding = False
