"""Who holds the floor, and what becomes of the agent's audio: the call's decisions, pure.

The way h11 keeps HTTP apart from sockets, `TurnState` keeps turn-taking apart from tasks,
queues and ADK: the call reports what happened (`handle(event)`) and carries out the actions it
gets back. Every decision about barge-in, discarding an interrupted turn and a model that
stopped answering is made here, so it is tested with values in and values out.

Barge-in is provisional. Gemini has no "cancel": when the caller coughs or says "mm-hm" over
a reply, a model that does not count it as a turn simply goes on, and a reply we threw away
is lost. So the moment our VAD hears the caller over the agent, the agent's audio is held
(Twilio's buffer is cleared, the unplayed audio kept); only once the caller has spoken for
`min_speech_ms` is the rest of the turn discarded. Shorter sounds (an "mm-hm" is about
400 ms of speech, a cough 150 ms) resume the held audio from where the caller stopped
hearing it, once they have been quiet for `resume_after_ms`. 500 ms is also LiveKit Agents'
default minimum interruption.
"""

from __future__ import annotations

from dataclasses import dataclass

from .outcome import Outcome

__all__ = [
    "AGENT_AUDIO",
    "CLOSING",
    "MODEL_INTERRUPTED",
    "MODEL_TURN_COMPLETE",
    "PLAY",
    "RESUME",
    "SESSION_RESTARTED",
    "Action",
    "AgentAudio",
    "CallerSpeechEnded",
    "CallerSpeechStarted",
    "CallerVoice",
    "Closing",
    "Event",
    "HANG_UP",
    "HANG_UP_MAX_S",
    "HANG_UP_QUIET_S",
    "HangUp",
    "HangUpRequested",
    "Goodbye",
    "IDLE_PROMPT",
    "Prompt",
    "WRAP_UP_PROMPT",
    "Hold",
    "Interrupt",
    "ModelInterrupted",
    "ModelOutput",
    "ModelTurnComplete",
    "Play",
    "RestartModel",
    "Resume",
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
class CallerVoice:
    """Where the caller's current utterance stands (reported while it may be a barge-in)."""

    speech_ms: int
    """From its onset to the end of its last speech frame."""
    silence_ms: int
    """Since its last speech frame."""


@dataclass(frozen=True, slots=True)
class CallerSpeechEnded:
    at: float


@dataclass(frozen=True, slots=True)
class ModelOutput:
    """The model answered: audio, its own transcript, or a tool call. (Its transcript of the
    caller is no answer: a stalled model may still transcribe.)"""

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
    """The call is saying its last words: nothing the caller or the model does cuts them."""


@dataclass(frozen=True, slots=True)
class HangUpRequested:
    """The agent ended the call (its `end_call` tool): once its goodbye has been heard."""

    at: float


@dataclass(frozen=True, slots=True)
class Tick:
    now: float
    playing: bool = False
    """Agent audio is queued or may still be playing at the caller's end."""


Event = (
    CallerSpeechStarted
    | CallerVoice
    | CallerSpeechEnded
    | ModelOutput
    | AgentAudio
    | ModelInterrupted
    | ModelTurnComplete
    | SessionRestarted
    | Closing
    | HangUpRequested
    | Tick
)

AGENT_AUDIO = AgentAudio()
MODEL_INTERRUPTED = ModelInterrupted()
MODEL_TURN_COMPLETE = ModelTurnComplete()
SESSION_RESTARTED = SessionRestarted()
CLOSING = Closing()


# Actions: what the call must do.


@dataclass(frozen=True, slots=True)
class Hold:
    """Stop the caller hearing the agent now (clear Twilio's buffer), keeping what they have
    not heard: this may be no interruption at all."""

    source: str


@dataclass(frozen=True, slots=True)
class Resume:
    """It was no interruption: play the held audio from where the caller stopped hearing it."""


@dataclass(frozen=True, slots=True)
class Interrupt:
    """The caller has the floor: clear Twilio's buffer and drop the rest of the agent's turn."""

    source: str
    by_caller: bool = True
    """The caller cut the reply off (else a reconnect did: the model is not to be told the
    caller interrupted it)."""


@dataclass(frozen=True, slots=True)
class Play:
    """Send this chunk of agent audio to the caller (held back while a barge-in is decided)."""


@dataclass(frozen=True, slots=True)
class RestartModel:
    """The live session is alive on paper only: restart it."""

    waited_s: float


@dataclass(frozen=True, slots=True)
class HangUp:
    """Let the stream go now: the agent asked to (a tool), and its last words have been heard."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """Ask the model, on the call's behalf, to say something (a text turn it answers)."""

    text: str


@dataclass(frozen=True, slots=True)
class Goodbye:
    """End the call with the recorded goodbye."""

    reason: str
    outcome: Outcome


Action = Hold | Resume | Interrupt | Play | RestartModel | HangUp | Prompt | Goodbye

PLAY = Play()
RESUME = Resume()
HANG_UP = HangUp()
HANG_UP_QUIET_S = 2.0
"""After `end_call`, a model silent this long has no more goodbye to say."""
HANG_UP_MAX_S = 30.0
"""After `end_call`, the call ends within this long whatever the model and the caller do."""
WRAP_UP_S = 60.0
"""Before the call's time limit (or a quarter of it, if shorter), the model is asked to wrap
up."""
WRAP_UP_PROMPT = (
    "(The call is about to reach its time limit. Wrap up now: answer briefly and say goodbye.)"
)
IDLE_PROMPT = (
    "(The caller has said nothing for a while. Ask once, briefly, whether they are still there.)"
)
_NOTHING: tuple[Action, ...] = ()
_PLAY: tuple[Action, ...] = (PLAY,)
_RESUME: tuple[Action, ...] = (RESUME,)


class TurnState:
    """One call's turn-taking. The call reports what it saw and does what it is told, so the
    rules (and their tests) need no call, socket or model."""

    def __init__(
        self,
        *,
        stall_s: float,
        min_speech_ms: int = 500,
        resume_after_ms: int = 600,
        started_at: float = 0.0,
        max_call_s: float = 0.0,
        caller_idle_s: float = 0.0,
    ) -> None:
        """`max_call_s`: the call's time limit from `started_at`; `caller_idle_s`: how long a
        caller may stay silent once the agent has finished, before one prompt and then the
        goodbye (0: no limit)."""
        self.started_at = started_at
        self.max_call_s = max_call_s
        self.caller_idle_s = caller_idle_s
        self._wrapped_up = False
        self._caller_speaking = False
        self._quiet_since: float | None = None
        """Since when neither the agent nor the caller has had anything to say."""
        self._idle_prompted = False
        self.hang_up_at: float | None = None
        """When the agent asked to end the call."""
        self._said_since_hang_up = False
        """A model turn ended after the request: the goodbye (if any) is all generated."""
        self._last_output = 0.0
        self.stall_s = stall_s
        self.min_speech_ms = min_speech_ms
        self.resume_after_ms = resume_after_ms
        self.generating = False
        """The model is sending a turn's audio."""
        self.discarding = False
        """The caller cut the model off: the rest of its turn is not played."""
        self.closing = False
        self.holding = False
        """The agent's audio is held back while we find out whether the caller interrupts."""
        self.watching = False
        """The caller started speaking over the agent and has not finished: it may yet
        become an interruption."""
        self.awaiting_reply_since: float | None = None
        """When the caller finished speaking to a model that has not answered since: from
        then on they wait, and a model silent too long is restarted."""
        self._cut_off = False
        """A restart cut the model's reply off: the new session answers afresh, and the rest
        of the old reply would have the caller hear its start twice."""
        self._backchannel = False
        """The caller's utterance began over the agent and has not (yet) interrupted it: a
        cough or an "mm-hm" asks for no answer."""

    def handle(self, event: Event) -> tuple[Action, ...]:
        match event:
            case AgentAudio():
                if self.discarding or self.closing:
                    return _NOTHING
                self.generating = True
                return _PLAY
            case CallerVoice(speech_ms=speech, silence_ms=silence):
                if not self.watching:
                    return _NOTHING
                if speech >= self.min_speech_ms:
                    self.watching = self.holding = self._backchannel = False
                    return self._interrupt("caller speech")
                if self.holding and silence >= self.resume_after_ms:
                    self.holding = False
                    return _RESUME
            case ModelOutput(at=at):
                self._last_output = at
                self.awaiting_reply_since = None
                if self._cut_off:
                    self._cut_off = False
                    return (Interrupt("a reconnect cut the reply off", by_caller=False),)
            case CallerSpeechStarted(agent_audible=audible):
                self._caller_speaking, self._idle_prompted, self._quiet_since = True, False, None
                self.awaiting_reply_since = None  # they talk again: the wait starts at its end
                self._backchannel = audible and not self.closing
                if self._backchannel:
                    self.watching = self.holding = True
                    return (Hold("caller speech"),)
            case CallerSpeechEnded(at=at):
                self.watching = self._caller_speaking = False
                if not self._backchannel:
                    self.awaiting_reply_since = at
                self._backchannel = False
                if self.holding:
                    self.holding = False
                    return _RESUME
            case ModelInterrupted():
                if self.closing:
                    return _NOTHING
                if self.watching:
                    # Its VAD heard the caller too; whether the turn is lost is ours to say
                    # (by how long they speak): keep what it generated until then.
                    self._end_turn()
                    return _NOTHING
                actions = self._interrupt("model interrupted")
                self._end_turn()
                return actions
            case ModelTurnComplete():
                self._end_turn()
            case HangUpRequested(at=at):
                if self.hang_up_at is None:
                    self.hang_up_at, self._said_since_hang_up = at, False
            case SessionRestarted():
                self._cut_off = self.generating
                self._end_turn()
            case Closing():
                self.closing = True
                self.watching = self.holding = False
            case Tick(now=now, playing=playing):
                if self._hang_up_due(now, playing):
                    self.hang_up_at = None  # after pressing keys the call goes on
                    return (HANG_UP,)
                if (limit := self._limits(now, playing)) is not None:
                    return (limit,)
                since = self.awaiting_reply_since
                if since is not None and now - since >= self.stall_s:
                    self.awaiting_reply_since = now  # still waiting: watch the next session
                    return (RestartModel(now - since),)
        return _NOTHING

    def _limits(self, now: float, playing: bool) -> Prompt | Goodbye | None:
        """The call's time limit (a wrap-up request first) and the silent caller (one prompt
        through the model first)."""
        if self.closing:
            return None
        busy = (
            playing
            or self.generating
            or self._caller_speaking
            or self.awaiting_reply_since is not None
            or self.hang_up_at is not None
        )
        if self.max_call_s:
            elapsed = now - self.started_at
            if elapsed >= self.max_call_s:
                return Goodbye("the call reached its time limit", Outcome.TIME_LIMIT)
            wrap_up_at = self.max_call_s - min(WRAP_UP_S, self.max_call_s / 4)
            if not self._wrapped_up and not busy and elapsed >= wrap_up_at:
                # a text turn cuts off whoever speaks: wait for a moment nobody does
                self._wrapped_up = True
                return Prompt(WRAP_UP_PROMPT)
        if not self.caller_idle_s:
            return None
        if busy:
            self._quiet_since = None
            return None
        if self._quiet_since is None:
            self._quiet_since = now
        if now - self._quiet_since < self.caller_idle_s:
            return None
        self._quiet_since = None
        if self._idle_prompted:
            return Goodbye("the caller stayed silent", Outcome.CALLER_IDLE)
        self._idle_prompted = True
        return Prompt(IDLE_PROMPT)

    def _hang_up_due(self, now: float, playing: bool) -> bool:
        """After `end_call`, the goodbye: the model may say it before the tool call (in the
        same turn) or after (the reply to the tool's result). Either way the call ends once
        the caller has heard all of it: a turn has ended since, or the model has been quiet
        for `HANG_UP_QUIET_S`, and nothing is left to play. `HANG_UP_MAX_S` bounds it all."""
        if self.hang_up_at is None:
            return False
        if now - self.hang_up_at >= HANG_UP_MAX_S:
            return True
        quiet = now - max(self.hang_up_at, self._last_output) >= HANG_UP_QUIET_S
        return not playing and not self.generating and (self._said_since_hang_up or quiet)

    def _interrupt(self, source: str) -> tuple[Action, ...]:
        if self.generating:
            self.discarding = True
        return (Interrupt(source),)

    def _end_turn(self) -> None:
        # On 2.5 models the tool runs just before the turn_complete of its own tool call: only
        # output after the request makes a turn end the goodbye.
        self._said_since_hang_up = (
            self.hang_up_at is not None and self._last_output > self.hang_up_at
        )
        self.generating = False
        self.discarding = False
