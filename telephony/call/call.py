"""One phone call bridged to one ADK live session: the only place Twilio, audio and ADK meet.

A `Call` carries out decisions made elsewhere: who holds the floor in its `TurnState` (pure),
the live session's restarts in its `LiveSupervisor`. It owns three tasks (the model event pump,
which runs the supervisor; the paced player; the caller watch, which notices stopped caller
audio and a stalled model) and ends them all in `close()`. Caller audio flows synchronously
from `handle()` into the live queue. Agent audio goes from the pump into the player's queue;
what Twilio has room for leaves at once from the pump, the rest is paced out by the player
task. So the pump awaits the socket only for the lead's worth of audio (writes that block only
once the transport buffer is full), never for pacing: ADK hands events over through a queue
of one, and a slow consumer stalls the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from google.adk.agents.run_config import RunConfig
from google.adk.events import Event
from google.adk.runners import Runner

from ..audio import InboundConverter, OutboundConverter
from ..audio.echo import ECHO_RETURN_LOSS, EchoSuppressor
from ..audio.vad import SpeechEnd, SpeechStart, VoiceActivityDetector
from ..twilio.media_stream import Dtmf, InboundEvent, Mark, Media, Start, Stop
from ..twilio.targets import AllowList, TargetError, key_digits, transfer_target
from .heard import Reply
from .keys import KeyBuffer, keys_text
from .logs import CallLogger
from .outcome import Outcome
from .playback import Histogram, Player, UnknownMark
from .record import CallRecord
from .recording import CallRecorder
from .supervisor import (
    CALLER_BATCH_BYTES,
    CALLER_FRAME_BYTES,
    CallerAudioQueue,
    LiveSupervisor,
    ModelStalled,
)
from .tools import register, unregister
from .turns import (
    AGENT_AUDIO,
    CLOSING,
    MODEL_INTERRUPTED,
    MODEL_TURN_COMPLETE,
    SESSION_RESTARTED,
    Action,
    CallerSpeechEnded,
    CallerSpeechStarted,
    CallerVoice,
    Goodbye,
    HangUp,
    HangUpRequested,
    Hold,
    Interrupt,
    ModelOutput,
    Prompt,
    RestartModel,
    Resume,
    Tick,
    TurnState,
)

__all__ = [
    "CALL_TASKS",
    "Call",
    "CallInfo",
    "CallOptions",
    "Handover",
    "ModelStalled",
    "asset",
]

AGENT_AUDIO_MIME = "audio/pcm;rate=24000"
CLOSE_GRACE_S = 3.0
"""How long the live session gets to wind down after the queue is closed before it is cancelled."""
ATTACH_WAIT_S = 5.0
"""Last words for a call whose stream is not open yet wait this long for it."""
LAST_WORDS_MARGIN_S = 2.0
"""Beyond its own length, how long a closing message may take to play before we hang up."""
MACHINE_ANSWERED = (
    "(An answering machine took the call and its beep has sounded: leave your message now, "
    "in a few sentences, then call end_call.)"
)
"""The turn the model gets when Twilio's answering machine detection reports a machine."""
URGENT_AFTER_ONSET_S = 0.3
"""After our VAD hears the caller start, caller audio goes to the model in URGENT_BYTES pieces:
its own VAD wants some 200 ms of speech before it interrupts its reply. The onset itself, with
all that was held before it, goes at once."""
URGENT_PAUSE_MS = 400
"""The same once the caller has been silent this long after speech: the model's VAD ends a
turn after 500-800 ms of silence, and answers then, so the frames that complete its silence
must not wait in a batch (earlier ones may: they are sent with the first that may not)."""
URGENT_AFTER_END_S = 0.3
"""And on after our VAD ends the utterance (600 ms of silence): to 900 ms."""
URGENT_BYTES = 2 * CALLER_FRAME_BYTES
"""40 ms: in those windows the model hears each piece at most 20 ms late, for half the
messages that frame by frame would take (a third of all a call sends upstream)."""
STREAM_RETURN_S = 60.0
"""A call that let its stream go for Twilio to press keys ends if no new stream comes by then
(64 keys with pauses take well under it)."""
REACTION_BUCKETS_S = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)
"""The barge-in reaction includes the VAD's onset rule (4 speech frames of 6: 80-120 ms)."""


def asset(name: str) -> bytes:
    """A recorded message shipped with the package (8 kHz mu-law), playable without a model."""
    return (resources.files("telephony.call") / "assets" / f"{name}.ulaw").read_bytes()


CALL_TASKS = ("pump", "player", "watch", "live")
"""Every task a call runs is named PREFIX-CALLSID with one of these prefixes."""


@dataclass(frozen=True)
class CallInfo:
    call_sid: str
    caller: str
    callee: str
    direction: str = "inbound"
    """Twilio's `Direction`: inbound, outbound-api, outbound-dial."""
    parameters: Mapping[str, str] = field(default_factory=dict)
    """The stream's other <Parameter>s: SIP details (`Sip...`) and any custom ones."""

    @classmethod
    def from_parameters(cls, call_sid: str, parameters: Mapping[str, str]) -> CallInfo:
        """From a stream's custom parameters (see `twiml.call_parameters`)."""
        others = {k: v for k, v in parameters.items() if k not in _OWN_PARAMETERS}
        return cls(
            call_sid,
            parameters.get("caller", ""),
            parameters.get("callee", ""),
            parameters.get("direction", "") or "inbound",
            others,
        )

    def stream_parameters(self) -> dict[str, str]:
        """What `from_parameters` reads back (the call's <Parameter>s for a new stream)."""
        own = {"callSid": self.call_sid, "caller": self.caller, "callee": self.callee}
        return {**own, "direction": self.direction, **self.parameters}

    def state(self) -> dict[str, Any]:
        """The session state an agent sees from its first turn (its instruction can say
        `{telephony_caller}`); the keys are documented in README."""
        sip = {k: v for k, v in self.parameters.items() if k.startswith("Sip")}
        return {
            "telephony_call_sid": self.call_sid,
            "telephony_caller": self.caller,
            "telephony_called": self.callee,
            "telephony_direction": self.direction,
            "telephony_sip": sip,
            "telephony_parameters": {k: v for k, v in self.parameters.items() if k not in sip},
        }


_OWN_PARAMETERS = frozenset({"callSid", "caller", "callee", "direction"})


@dataclass(frozen=True)
class Handover:
    """How a call leaves its media stream, for the stream's `<Connect action>` to carry out:
    hang up (neither set), connect the caller elsewhere, or press keys and come back on a new
    stream for the same call."""

    transfer_to: str = ""
    caller_id: str = ""
    """The transfer's caller ID (empty: Twilio's default, the caller's number)."""
    digits: str = ""


@dataclass(frozen=True)
class CallOptions:
    playback_lead_ms: int = 400
    barge_in_aggressiveness: int = 3
    barge_in_frames: int = 4
    barge_in_min_speech_ms: int = 500
    """Speech over the agent holds its audio at once; this much discards the rest of its turn."""
    barge_in_resume_ms: int = 600
    """Silence after a shorter sound over the agent before its held audio plays on."""
    keys_idle_s: float = 2.0
    """Key presses go to the model as one turn on `#` or after this long without a key."""
    caller_silence_ms: int = 1000
    greeting: str | None = None
    record_dir: Path | None = None
    """Write each call's recording (JSON Lines and WAV) here; None: do not record."""
    model_restarts: int = 3
    """Times run_live is restarted after failing (ADK's own reconnects exhausted) before the
    caller hears an apology and the call ends; any model output in between resets the count."""
    mask_callers: bool = False
    """Keep phone numbers, DTMF digits and transcripts out of the logs."""
    model_stall_s: float = 15.0
    """The caller finished speaking and the model has said nothing at all for this long: the
    live session is taken as stalled and restarted."""
    model_connections_per_minute: int = 6
    """Live connections (the first, ADK's reconnects and restarts) allowed within any 60 s;
    one more means the service keeps dropping us: the caller hears an apology and the call ends."""
    transfer_allow: AllowList = field(default_factory=lambda: AllowList([]))
    """Where the agent's `transfer_call` may send the caller (empty: nowhere)."""
    caller_id: str = ""
    """The number transfers (and outbound calls) come from, when set."""
    heard_notes: bool = True
    """Tell the model what the caller heard of a reply they cut off (see `heard`)."""
    max_call_s: float = 0.0
    """The call's time limit: the model is asked to wrap up a minute before, then the caller
    hears the recorded goodbye (0: none)."""
    caller_idle_s: float = 0.0
    """A caller silent this long after the agent finished is asked through the model whether
    they are still there; as long again, and they hear the goodbye (0: never)."""
    previous_calls: int = 0
    """Earlier calls of the same caller the session starts with (see `previous`)."""


class Call:
    """A live conversation between one caller and the agent."""

    def __init__(
        self,
        info: CallInfo,
        *,
        runner: Runner,
        run_config: RunConfig,
        options: CallOptions,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """`clock` defaults to the event loop's, so a loop with virtual time drives it too."""
        clock = clock or asyncio.get_running_loop().time
        self.info = info
        self._options = options
        self._clock = clock
        self._log = CallLogger(info.call_sid, mask=options.mask_callers)
        self.turns = TurnState(
            stall_s=options.model_stall_s,
            min_speech_ms=options.barge_in_min_speech_ms,
            resume_after_ms=options.barge_in_resume_ms,
            started_at=clock(),
            max_call_s=options.max_call_s,
            caller_idle_s=options.caller_idle_s,
        )
        self._keys = KeyBuffer(idle_s=options.keys_idle_s)
        self.record = CallRecord(lambda: self.live.session(), call_sid=info.call_sid)
        self.live = LiveSupervisor(
            runner,
            run_config,
            user_id=info.caller or "unknown",
            session_id=info.call_sid,
            state={**info.state(), "telephony_started_at": self.record.started_at},
            restarts=options.model_restarts,
            connections_per_minute=options.model_connections_per_minute,
            # an outbound call's `From` is our own number: its earlier calls are strangers'
            previous_calls=0 if info.direction.startswith("outbound") else options.previous_calls,
            on_event=self._on_model_event,
            on_reconnect=self._on_reconnect,
            log=self._log,
        )
        self._inbound = InboundConverter()
        self._suppressor = EchoSuppressor()
        self._outbound = OutboundConverter()
        self._vad = VoiceActivityDetector(
            aggressiveness=options.barge_in_aggressiveness, start_frames=options.barge_in_frames
        )
        self.player = Player(lead_ms=options.playback_lead_ms, clock=clock)
        self.stream_sid = ""
        self._attached = asyncio.Event()
        self._stream: asyncio.Event | None = None
        """Set once the call lets its current media stream go: a new one replaced it, or the
        call handed the caller to Twilio (`handover`)."""
        self._leaving: Handover | None = None
        """What the agent asked for (its tools), once its last words are heard."""
        self.handover: Handover | None = None
        """What the stream's `<Connect action>` is to do now that the call let it go."""
        self._return_timer: asyncio.TimerHandle | None = None
        self.done = asyncio.Event()
        """Set once the call is over, whoever ended it; the socket handler then hangs up."""
        self.end_reason = ""
        self.outcome: Outcome | None = None
        """How the call ended, in a word (set with `end_reason`)."""
        self._last_media = clock()
        self._urgent_until = 0.0
        """Caller audio goes to the model frame by frame until then (see `_on_media`)."""
        self._caller_audio_ended = False
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: asyncio.Task[None] | None = None
        self.barge_ins = 0
        self.false_barge_ins = 0
        """Holds that ended in the agent playing on (a cough, an "mm-hm", a short noise)."""
        self.barge_in_reaction = Histogram(REACTION_BUCKETS_S)
        """Per barge-in: from the onset of the caller's speech over the agent to the clear."""
        self._onset: float | None = None
        """When the caller started speaking over the agent, until the clear that answers it."""
        self._held = False
        """A hold cut the caller off from agent audio they had not heard yet."""
        self._reply: Reply | None = None
        """The model's latest reply, until the next one starts: the caller may cut it off
        while it plays, long after the model finished it."""
        self.recorder: CallRecorder | None = None
        if options.record_dir:
            try:
                self.recorder = CallRecorder(
                    options.record_dir,
                    call_sid=info.call_sid,
                    caller=info.caller,
                    callee=info.callee,
                    agent=getattr(runner, "app_name", ""),
                    clock=clock,
                )
            except OSError as exc:  # the recording is lost, never the call
                self._log("not recorded: %s", exc, level=logging.ERROR)

    @property
    def live_queue(self) -> CallerAudioQueue:
        """Where the live session reads from now (a restart replaces it)."""
        return self.live.queue

    @property
    def model_restarts(self) -> int:
        return self.live.restarts

    @property
    def model_reconnects(self) -> int:
        return self.live.reconnects

    @property
    def caller_audio_dropped(self) -> int:
        """Caller frames dropped because the model was not reading them."""
        return self.live.caller_audio_dropped

    def start(self) -> None:
        """Opens the live session now, before the media stream exists, so the greeting is ready
        by the time the caller can hear it."""
        if self._tasks:
            return
        self._log(
            "live session starting (caller %s)", self._log.number(self.info.caller or "unknown")
        )
        self._tasks = [
            asyncio.create_task(self._pump(), name=f"pump-{self.info.call_sid}"),
            asyncio.create_task(self.player.run(), name=f"player-{self.info.call_sid}"),
            asyncio.create_task(self._watch_caller(), name=f"watch-{self.info.call_sid}"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_ended)
        register(self.info.call_sid, self)
        if self._options.greeting and self.info.direction == "inbound":
            # An outbound call's far end speaks first (or its answering machine does).
            self.live.send_text(self._options.greeting)

    def attach(self, start: Start, send: Callable[[str], Awaitable[None]]) -> asyncio.Event:
        """The call's audio now flows over this media stream. A second stream for the call
        (Twilio reconnected) takes over from the first: the returned event is set then, and
        the old stream's handler lets it go without ending the call."""
        if self._stream is not None and not self._stream.is_set():
            self._stream.set()
            self._log("media stream %s replaces the previous one", start.stream_sid)
        if self._return_timer is not None:
            self._return_timer.cancel()
            self._return_timer = None
        self._stream = replaced = asyncio.Event()
        self.stream_sid = start.stream_sid
        self._last_media = self._clock()
        if (recorder := self.recorder) is not None:
            recorder.twilio_in(start)
            unrecorded = send

            async def send(text: str) -> None:
                recorder.twilio_out(text)
                await unrecorded(text)

        self.player.attach(start.stream_sid, send)
        self._attached.set()
        self._log("media stream %s attached", start.stream_sid)
        return replaced

    async def handle(self, event: InboundEvent) -> None:
        """One message from Twilio, in order."""
        if self.recorder is not None:
            self.recorder.twilio_in(event)
        if isinstance(event, Media):
            await self._on_media(event.payload)
        elif isinstance(event, Mark):
            try:
                self.player.on_mark(event.name)
            except UnknownMark as exc:
                self._log("ignored mark: %s", exc, level=logging.WARNING)
        elif isinstance(event, Dtmf):
            self._log("caller pressed %s", self._log.keys(event.digit))
            if (keys := self._keys.press(event.digit, self._clock())) is not None:
                self._send_keys(keys)
        elif isinstance(event, Stop):
            await self.close("caller hung up (stop)", Outcome.HUNG_UP)

    async def _on_media(self, mulaw: bytes) -> None:
        """Caller audio to the model, with the agent's echo in it replaced by the line's
        noise (the model's VAD would take it for the caller), and as it came to our VAD for
        barge-in, which ignores the echo itself."""
        pcm = self._inbound.convert(mulaw)
        now = self._last_media = self._clock()
        echo = self.player.loudest_recent(now) * ECHO_RETURN_LOSS
        self._caller_audio_ended = False
        changes = self._vad.feed(pcm, min_energy=echo)
        for speech in changes:
            after = URGENT_AFTER_ONSET_S if isinstance(speech, SpeechStart) else URGENT_AFTER_END_S
            self._urgent_until = now + after
        # The model's own VAD decides its turns: audio around an onset or an end (or late in
        # a pause that may be one) goes at once or nearly, the rest in batches.
        if any(isinstance(speech, SpeechStart) for speech in changes):
            gather = 0
        elif now < self._urgent_until or self._vad.silence_ms >= URGENT_PAUSE_MS:
            gather = URGENT_BYTES
        else:
            gather = CALLER_BATCH_BYTES
        self.live.send_caller_audio(self._suppressor.process(pcm, echo), gather=gather)
        for speech in changes:
            await self._caller_speech(speech, now, now)
        if self.turns.watching:
            vad = self._vad
            await self._act(self.turns.handle(CallerVoice(vad.speech_ms, vad.silence_ms)))

    async def _caller_speech(
        self, speech: SpeechStart | SpeechEnd, now: float, audio_end: float
    ) -> None:
        """The VAD's onset or end, found in the audio that ended arriving at `audio_end`: it
        happened as much earlier as it lies before the end of that audio, which is when the
        caller's wait for an answer, or a barge-in's, began."""
        at = audio_end - (self._vad.offset_ms - speech.offset_ms) / 1000
        if isinstance(speech, SpeechStart):
            turn: CallerSpeechStarted | CallerSpeechEnded = CallerSpeechStarted(
                now, agent_audible=self.player.busy()
            )
            self._onset = at if turn.agent_audible else None
        else:
            turn = CallerSpeechEnded(now)
        await self._act(self.turns.handle(turn))
        if isinstance(speech, SpeechEnd):
            self._onset = None
        self.player.waiting_since = at if self.turns.awaiting_reply_since is not None else None

    def _cleared(self) -> None:
        """A clear went out: the first after the caller started speaking over the agent is
        the barge-in's reaction."""
        if self._onset is not None:
            self.barge_in_reaction.observe(self._clock() - self._onset)
            self._onset = None

    def _send_keys(self, keys: str) -> None:
        self._log("keys to the model: %s", self._log.keys(keys))
        self.record.event("keys", digits=keys)
        self.live.send_text(keys_text(keys))

    async def _act(self, actions: tuple[Action, ...]) -> None:
        for action in actions:
            if isinstance(action, Hold):
                self._held = await self.player.hold()
                if self._held:
                    self._cleared()
                    self._log("holding agent audio (%s)", action.source)
                    self._record("hold", source=action.source)
            elif isinstance(action, Resume):
                if self._held:
                    self.false_barge_ins += 1
                    self._log("no interruption after all: agent audio plays on")
                    self._record("resume")
                self._held = False
                self.player.resume()
            elif isinstance(action, Interrupt):
                self._held = False
                self._outbound = OutboundConverter()
                if await self.player.clear():
                    self._cleared()
                    self.barge_ins += 1
                    self._log("barge-in (%s): cleared playback", action.source)
                    self._record("barge_in", source=action.source)
                    if action.by_caller:
                        self.record.event("barge_in", source=action.source)
                    reply = self._reply
                    if (
                        action.by_caller
                        and self._options.heard_notes
                        and reply is not None
                        and reply.heard_to is None
                    ):
                        reply.heard_to = self.player.heard_to
                        self._tell_what_was_heard()
            elif isinstance(action, RestartModel):
                self.live.restart(f"no model events for {action.waited_s:.0f} s")
            elif isinstance(action, HangUp):
                self._leave()
            elif isinstance(action, Prompt):
                self._log("asking the model: %s", action.text)
                self.live.send_text(action.text)
            elif isinstance(action, Goodbye):
                await self.end_with(asset("goodbye"), action.reason, action.outcome)

    async def _watch_caller(self) -> None:
        """Twilio normally streams 20 ms every 20 ms; when the caller's frames stop, tell the
        model the audio ended so it does not wait for silence that will never arrive. And when
        the caller waits for an answer that does not come, restart the stalled session."""
        period = self._options.caller_silence_ms / 4000
        while True:
            await asyncio.sleep(period)
            now = self._clock()
            await self._act(self.turns.handle(Tick(now, playing=self.player.busy())))
            if (keys := self._keys.due(now)) is not None:
                self._send_keys(keys)
            if (
                self.stream_sid
                and not self._caller_audio_ended
                and (self._clock() - self._last_media) * 1000 >= self._options.caller_silence_ms
            ):
                self._caller_audio_ended = True
                if (end := self._vad.end_of_stream()) is not None:  # an utterance ends with it
                    await self._caller_speech(end, now, self._last_media)
                self.live.end_caller_audio()
                self._log("caller audio stopped; sent audio_stream_end")

    async def _pump(self) -> None:
        error = await self.live.run()
        if self.done.is_set():
            return
        if error is None:
            self.end("live session ended", Outcome.MODEL_FAILED)
        else:
            await self.end_with(asset("apology"), "live session failed", Outcome.MODEL_FAILED)

    async def end_with(self, mulaw: bytes, reason: str, outcome: Outcome) -> None:
        """Plays a last message to the caller (instead of anything the agent had queued), then
        ends the call once it has been heard."""
        self.turns.handle(CLOSING)
        await self.player.clear()
        with contextlib.suppress(TimeoutError):  # failed before the stream opened: wait for it
            async with asyncio.timeout(ATTACH_WAIT_S):
                await self._attached.wait()
        if self.stream_sid:
            self.player.enqueue(mulaw)
            await self.player.flush()
            deadline = self._clock() + len(mulaw) / 8000 + LAST_WORDS_MARGIN_S
            while self.player.busy() and self._clock() < deadline:
                await asyncio.sleep(0.05)
        self.end(reason, outcome)

    async def _on_model_event(self, event: Event, output: bool) -> None:
        """`output`: the model said something (see `supervisor.is_model_output`)."""
        if self.recorder is not None:
            self.recorder.model_event(event)
        if output:
            await self._act(self.turns.handle(ModelOutput(self._clock())))
        if event.content and event.content.parts:
            for part in event.content.parts:
                blob = part.inline_data
                if blob and blob.data and (blob.mime_type or "").startswith("audio/pcm"):
                    self._on_agent_audio(blob.data, blob.mime_type or "")
        if event.input_transcription and event.input_transcription.finished:
            self.record.turns += 1
            self._log("caller said: %s", self._log.words(event.input_transcription.text or ""))
        if (said := event.output_transcription) and said.text:
            self._current_reply().transcribed(said.text, finished=bool(said.finished))
            if said.finished:
                self._log("agent said: %s", self._log.words(said.text))
        if event.interrupted or event.turn_complete:
            self._end_agent_audio()
            self._reply_done()  # a cut-off reply's note goes once the cut is known
        if event.interrupted:
            self._log("model reports the caller interrupted it")
            await self._act(self.turns.handle(MODEL_INTERRUPTED))
        elif event.turn_complete:
            self.turns.handle(MODEL_TURN_COMPLETE)
        await self.player.flush()

    def _current_reply(self) -> Reply:
        """The reply the model is generating: a new one once the last is done."""
        if self._reply is None or self._reply.done:
            self._reply = Reply(self.player.queued_total)
            self.record.turns += 1
        return self._reply

    def _reply_done(self) -> None:
        if self._reply is not None:
            self._reply.done = True
            self._tell_what_was_heard()

    def _tell_what_was_heard(self) -> None:
        """Once a reply the caller cut off is complete, the model learns what of it they
        heard (see `heard`), in the same live session."""
        if self._reply is None or (note := self._reply.note()) is None:
            return
        self._reply = None
        self._log(
            "the caller heard %.1f s of a %.1f s reply: telling the model",
            note.heard_s,
            note.generated_s,
        )
        self.live.send_note(note.text, note.record())
        self._record("heard", **note.record())

    def _on_reconnect(self) -> bool:
        """A new live connection replaced the old one, whose turn ended without turn_complete:
        the agent is not talking any more. True when the caller is owed an answer (they spoke
        and none came, or it was cut off)."""
        owed = self.turns.generating or self.turns.awaiting_reply_since is not None
        self._record("reconnect", restarts=self.live.restarts, reconnects=self.live.reconnects)
        self.record.event("reconnect", restarts=self.live.restarts, reconnects=self.live.reconnects)
        self.turns.handle(SESSION_RESTARTED)
        self._reply_done()
        return owed

    def _record(self, event: str, **fields: object) -> None:
        if self.recorder is not None:
            self.recorder.call_event(event, **fields)

    def _on_agent_audio(self, pcm: bytes, mime_type: str) -> None:
        if mime_type.replace(" ", "") != AGENT_AUDIO_MIME:
            self._log("dropped agent audio in unexpected format %s", mime_type, level=logging.ERROR)
            return
        self._current_reply().audio(len(pcm))
        if self.turns.handle(AGENT_AUDIO):
            self.player.enqueue(self._outbound.convert(pcm))

    def _end_agent_audio(self) -> None:
        """The model's turn is over: the end of its audio that the converter still holds plays
        now, behind it, not at the start of the next turn (see `OutboundConverter.flush`).
        Called before the turn state hears of the end: the rest is the turn's own audio, played,
        held or dropped as the turn's is."""
        if (rest := self._outbound.flush()) and self.turns.handle(AGENT_AUDIO):
            self.player.enqueue(rest)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._log("task %s failed: %r", task.get_name(), task.exception(), level=logging.ERROR)
        self.end(f"internal error in {task.get_name()}", Outcome.INTERNAL_ERROR)

    @property
    def stream_released(self) -> bool:
        """The call let its stream go and waits for a new one (keys being pressed)."""
        return self._stream is not None and self._stream.is_set() and not self.done.is_set()

    @property
    def transfers_allowed(self) -> bool:
        return bool(self._options.transfer_allow)

    def answered_by(self, who: str) -> None:
        """Twilio's answering machine detection: the model learns who took the call (and the
        session state keeps it as `telephony_answered_by`). A machine's beep has sounded by
        then: the model leaves its message now. A fax gets nothing to hear."""
        self._log("answered by %s", who)
        if who == "fax":
            self.end("a fax machine answered", Outcome.FAX)
        elif who.startswith("machine"):
            self.live.tell(MACHINE_ANSWERED, state={"telephony_answered_by": who})
        else:  # a person is talking with the agent already: nothing to interrupt them with
            self.live.update_state({"telephony_answered_by": who})

    def end_after_reply(self) -> None:
        """The agent's `end_call`: the call ends once its goodbye has been heard (a transfer
        or keys asked for already go ahead: the call ends with them)."""
        self._log("the agent ends the call once its goodbye is heard")
        if self._leaving is None:
            self._after_reply(Handover())

    def transfer(self, target: str) -> str:
        """The agent's `transfer_call`: once its handover line is heard, Twilio connects the
        caller to `target`. Raises `TargetError` for a target it may not or cannot use."""
        checked = transfer_target(target)
        if not self._options.transfer_allow.allows(checked):
            raise TargetError(f"transfers to {target} are not allowed")
        self._check_free()
        self._log("the agent transfers the caller to %s", self._log.number(checked))
        self._after_reply(Handover(transfer_to=checked, caller_id=self._caller_id()))
        return checked

    def press_keys(self, digits: str) -> str:
        """The agent's `send_dtmf`: once what it says now is heard, the stream ends, Twilio
        plays the tones (tones written into a bidirectional stream are reported not to
        pass), and a new stream carries on this call. Raises `TargetError` for bad keys."""
        checked = key_digits(digits)
        self._check_free()
        self._log("the agent presses %s", self._log.keys(checked))
        self._after_reply(Handover(digits=checked))
        return checked

    def _check_free(self) -> None:
        """One handover at a time: keys being pressed, or a transfer or keys already asked
        for, come first."""
        if self.stream_released:
            raise TargetError("the keys are still being pressed; try again in a moment")
        if self._leaving is not None:
            raise TargetError("a transfer or key press is already under way")

    def _caller_id(self) -> str:
        """Who a transfer is from: the configured caller ID, else the number the caller
        dialled (a SIP caller's own address is no caller ID for a phone number)."""
        if self._options.caller_id:
            return self._options.caller_id
        return self.info.callee if self.info.callee.startswith("+") else ""

    def _after_reply(self, handover: Handover) -> None:
        self._leaving = handover
        self.turns.handle(HangUpRequested(self._clock()))

    def _leave(self) -> None:
        """The agent's last words before a handover have been heard: let the stream go."""
        handover, self._leaving = self._leaving or Handover(), None
        self.handover = handover
        if handover.transfer_to:
            self.end(
                f"transferred to {self._log.number(handover.transfer_to)}", Outcome.TRANSFERRED
            )
        elif not handover.digits:
            self.end("the agent ended the call", Outcome.AGENT_ENDED)
        elif self._stream is not None:
            self._record("released", digits=handover.digits)
            self.player.detach()
            self._stream.set()
            if self._return_timer is not None:
                self._return_timer.cancel()
            self._return_timer = asyncio.get_running_loop().call_later(
                STREAM_RETURN_S,
                self.end,
                "no media stream after the keys were pressed",
                Outcome.NO_STREAM,
            )

    def end(self, reason: str, outcome: Outcome) -> None:
        """Marks the call over, whoever ends it (the socket handler then hangs up); the first
        reason given is the one that counts."""
        if not self.end_reason:
            self.end_reason, self.outcome = reason, outcome
        self.done.set()

    async def close(self, reason: str, outcome: Outcome) -> None:
        """Ends the call and everything it owns; safe to call any number of times."""
        self.end(reason, outcome)
        if self._closing is None:
            self._closing = asyncio.create_task(self._shutdown())
        await asyncio.shield(self._closing)

    async def _shutdown(self) -> None:
        unregister(self.info.call_sid, self)
        if self._return_timer is not None:
            self._return_timer.cancel()
        self.live.close()
        try:
            await self._end_tasks()
        finally:
            if self.recorder is not None:
                self.recorder.close(self.end_reason)
            transfer_to = self.handover.transfer_to if self.handover else ""
            outcome = self.outcome or Outcome.INTERNAL_ERROR
            self.record.end(self.end_reason, outcome, self.info.direction, transfer_to)
            await self.record.close(self.live.stored_session)
        ledger = self.player.ledger
        self._log(
            "ended: %s; agent audio sent %.1f s, barge-ins %d (and %d false), marks sent %d "
            "played %d cleared %d; dropped: caller audio %.1f s, agent audio %.1f s; lead %.0f ms "
            "for a round trip of %.0f ms",
            self.end_reason,
            ledger.sent_bytes / 8000,
            self.barge_ins,
            self.false_barge_ins,
            ledger.marks_sent,
            ledger.marks_played,
            ledger.marks_cleared,
            self.caller_audio_dropped * 0.02,
            self.player.overflow_bytes / 8000,
            self.player.lead_ms,
            ledger.round_trip.seconds * 1000,
        )

    async def _end_tasks(self) -> None:
        if not self._tasks:
            return
        pump, *others = self._tasks
        for task in others:
            task.cancel()
        try:
            async with asyncio.timeout(CLOSE_GRACE_S):
                await pump  # cancelled with us on the timeout
        except (TimeoutError, asyncio.CancelledError):
            self._log("live session did not end within %.0f s; cancelled", CLOSE_GRACE_S)
        except Exception as exc:
            self._log("live session ended with %r", exc, level=logging.WARNING)
        await asyncio.gather(*others, return_exceptions=True)
