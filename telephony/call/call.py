"""One phone call bridged to one ADK live session: the only place Twilio, audio and ADK meet.

A `Call` owns three tasks (the model event pump, which runs the live session in a task of its
own and restarts it if need be; the paced player; the caller watch, which notices stopped
caller audio and a stalled model) and ends them all in `close()`. Caller audio flows
synchronously from `handle()` into the LiveRequestQueue. Agent audio goes from the pump into
the player's queue; what Twilio has room for leaves at once from the pump, the rest is paced
out by the player task. So the pump awaits the socket only for the lead's worth of audio
(writes that block only once the transport buffer is full), never for pacing: ADK hands
events over through a queue of one, and a slow consumer stalls the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from google.adk.agents.live_request_queue import LiveRequestQueue
from google.adk.agents.run_config import RunConfig
from google.adk.events import Event
from google.adk.runners import Runner
from google.genai import types

from ..audio import InboundConverter, OutboundConverter
from ..audio.vad import SpeechStart, VoiceActivityDetector
from ..twilio.media_stream import Dtmf, InboundEvent, Mark, Media, Start, Stop
from ..twilio.signatures import mask_number
from .playback import Player, UnknownMark
from .recording import CallRecorder

__all__ = ["CALL_TASKS", "Call", "CallInfo", "CallOptions", "ModelStalled"]

log = logging.getLogger(__name__)

AGENT_AUDIO_MIME = "audio/pcm;rate=24000"
CALLER_AUDIO_MIME = "audio/pcm;rate=16000"
CLOSE_GRACE_S = 3.0
"""How long the live session gets to wind down after the queue is closed before it is cancelled."""
ATTACH_WAIT_S = 5.0
"""Last words for a call whose stream is not open yet wait this long for it."""
LAST_WORDS_MARGIN_S = 2.0
"""Beyond its own length, how long a closing message may take to play before we hang up."""


def asset(name: str) -> bytes:
    """A recorded message shipped with the package (8 kHz mu-law), playable without a model."""
    return (resources.files("telephony.call") / "assets" / f"{name}.ulaw").read_bytes()


CALL_TASKS = ("pump", "player", "watch", "live")
"""Every task a call runs is named PREFIX-CALLSID with one of these prefixes."""
CALLER_BACKLOG_LIMIT = 250
"""Requests (20 ms frames) waiting for the model beyond which caller audio is dropped."""


class CallerAudioQueue(LiveRequestQueue):
    """ADK's queue never pushes back. When the model stops reading (a stall, a reconnect),
    caller audio beyond 5 s of backlog is dropped, newest first, rather than piling up:
    what the caller says once the model is back still gets through at once."""

    def offer(self, blob: types.Blob) -> bool:
        if self._queue.qsize() >= CALLER_BACKLOG_LIMIT:
            return False
        self.send_realtime(blob)
        return True


class ModelStalled(RuntimeError):
    """The live session went silent while the caller waited for an answer."""


@dataclass(frozen=True)
class CallInfo:
    call_sid: str
    caller: str
    callee: str


@dataclass(frozen=True)
class CallOptions:
    playback_lead_ms: int = 400
    barge_in_aggressiveness: int = 3
    barge_in_frames: int = 4
    caller_silence_ms: int = 1000
    greeting: str | None = None
    record_dir: Path | None = None
    """Write each call's recording (JSON Lines and WAV) here; None: do not record."""
    model_restarts: int = 3
    """Times run_live is restarted after failing (ADK's own reconnects exhausted) before the
    caller hears an apology and the call ends; any model event in between resets the count."""
    mask_callers: bool = False
    """Keep phone numbers, DTMF digits and transcripts out of the logs."""
    model_stall_s: float = 15.0
    """The caller finished speaking and the model has said nothing at all for this long: the
    live session is taken as stalled and restarted."""


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
        self._runner = runner
        self._run_config = run_config
        self._options = options
        self._clock = clock
        self.live_queue = CallerAudioQueue()
        self._inbound = InboundConverter()
        self._outbound = OutboundConverter()
        self._vad = VoiceActivityDetector(
            aggressiveness=options.barge_in_aggressiveness, start_frames=options.barge_in_frames
        )
        self.player = Player(lead_ms=options.playback_lead_ms, clock=clock)
        self.stream_sid = ""
        self._attached = asyncio.Event()
        self.done = asyncio.Event()
        """Set once the call is over, whoever ended it; the socket handler then hangs up."""
        self.end_reason = ""
        self._generating = False
        self._discarding = False
        self._ending = False
        """Saying last words: no agent audio and no barge-in any more."""
        self._last_media = clock()
        self._caller_audio_ended = False
        self._tasks: list[asyncio.Task[None]] = []
        self._run: asyncio.Task[None] | None = None
        self._model_events = 0
        self._awaiting_reply_since: float | None = None
        self._closing: asyncio.Task[None] | None = None
        self.barge_ins = 0
        self.model_restarts = 0
        self.caller_audio_dropped = 0
        """Caller frames dropped because the model was not reading them."""
        self._dropping = False
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

    def _number(self, number: str) -> str:
        return mask_number(number) if self._options.mask_callers else number

    def _words(self, text: str) -> str:
        return f"({len(text)} characters)" if self._options.mask_callers else text

    def _log(self, message: str, *args: object, level: int = logging.INFO) -> None:
        log.log(level, "call %s: " + message, self.info.call_sid, *args)

    def start(self) -> None:
        """Opens the live session now, before the media stream exists, so the greeting is ready
        by the time the caller can hear it."""
        if self._tasks:
            return
        self._log("live session starting (caller %s)", self._number(self.info.caller or "unknown"))
        self._tasks = [
            asyncio.create_task(self._pump(), name=f"pump-{self.info.call_sid}"),
            asyncio.create_task(self.player.run(), name=f"player-{self.info.call_sid}"),
            asyncio.create_task(self._watch_caller(), name=f"watch-{self.info.call_sid}"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_ended)
        if self._options.greeting:
            self.live_queue.send_content(
                types.Content(role="user", parts=[types.Part(text=self._options.greeting)])
            )

    def attach(self, start: Start, send: Callable[[str], Awaitable[None]]) -> None:
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

    async def handle(self, event: InboundEvent) -> None:
        """One message from Twilio, in order."""
        if self.recorder is not None:
            self.recorder.twilio_in(event)
        if isinstance(event, Media):
            if self._on_media(event.payload):
                await self._barge_in("caller speech")
        elif isinstance(event, Mark):
            try:
                self.player.on_mark(event.name)
            except UnknownMark as exc:
                self._log("ignored mark: %s", exc, level=logging.WARNING)
        elif isinstance(event, Dtmf):
            self._log("caller pressed %s", "a key" if self._options.mask_callers else event.digit)
            self.live_queue.send_content(
                types.Content(
                    role="user",
                    parts=[types.Part(text=f"(The caller pressed {event.digit} on the keypad.)")],
                )
            )
        elif isinstance(event, Stop):
            await self.close("caller hung up (stop)")

    def _on_media(self, mulaw: bytes) -> bool:
        """Caller audio to the model; True when the caller just started talking over the agent."""
        pcm = self._inbound.convert(mulaw)
        accepted = self.live_queue.offer(types.Blob(data=pcm, mime_type=CALLER_AUDIO_MIME))
        if accepted == self._dropping:  # dropping starts or stops
            self._dropping = not accepted
            if accepted:
                self._log("the model reads caller audio again")
            else:
                self._log("the model is not reading: dropping caller audio", level=logging.WARNING)
        if not accepted:
            self.caller_audio_dropped += 1
        self._last_media = self._clock()
        self._caller_audio_ended = False
        onset = False
        for event in self._vad.feed(pcm):
            if isinstance(event, SpeechStart):
                onset = True
            elif self._awaiting_reply_since is None:
                self._awaiting_reply_since = self._clock()
        return onset and self.player.busy() and not self._ending

    async def _barge_in(self, source: str) -> None:
        """Cut the agent off: nothing of the interrupted turn reaches the caller any more."""
        if self._generating:
            self._discarding = True
        self._outbound = OutboundConverter()
        if await self.player.clear():
            self.barge_ins += 1
            self._log("barge-in (%s): cleared playback", source)

    async def _watch_caller(self) -> None:
        """Twilio normally streams 20 ms every 20 ms; when the caller's frames stop, tell the
        model the audio ended so it does not wait for silence that will never arrive. And when
        the caller waits for an answer that does not come, restart the stalled session."""
        period = self._options.caller_silence_ms / 4000
        while True:
            await asyncio.sleep(period)
            waiting = self._awaiting_reply_since
            if waiting is not None and self._clock() - waiting >= self._options.model_stall_s:
                self._awaiting_reply_since = None
                if self._run is not None:
                    self._run.cancel()
            if (
                self.stream_sid
                and not self._caller_audio_ended
                and (self._clock() - self._last_media) * 1000 >= self._options.caller_silence_ms
            ):
                self._caller_audio_ended = True
                self._vad.end_of_stream()
                self.live_queue.send_audio_stream_end()
                self._log("caller audio stopped; sent audio_stream_end")

    async def _pump(self) -> None:
        """Runs the live session, and runs it again when it fails (see `model_restarts`)."""
        failures = 0
        while True:
            self._model_events = 0
            run = asyncio.create_task(self._run_live(), name=f"live-{self.info.call_sid}")
            self._run = run
            try:
                await asyncio.wait({run})
            except asyncio.CancelledError:
                run.cancel()
                raise
            if self.done.is_set():
                return
            error = (
                ModelStalled(f"no model events for {self._options.model_stall_s:.0f} s")
                if run.cancelled()
                else run.exception()
            )
            if error is None:
                self.end("live session ended")
                return
            failures = 1 if self._model_events else failures + 1
            if failures > self._options.model_restarts:
                self._log("live session failed for good: %r", error, level=logging.ERROR)
                await self.end_with(asset("apology"), "live session failed")
                return
            self._log(
                "live session failed (%r); restarting it on the same session (%d of %d)",
                error,
                failures,
                self._options.model_restarts,
                level=logging.WARNING,
            )
            self.model_restarts += 1
            self._restart_queue()
            await asyncio.sleep(0.2 * failures)

    async def _run_live(self) -> None:
        async for event in self._runner.run_live(
            user_id=self.info.caller or "unknown",
            session_id=self.info.call_sid,
            live_request_queue=self.live_queue,
            run_config=self._run_config,
        ):
            self._model_events += 1
            self._awaiting_reply_since = None
            await self._on_model_event(event)
            await self.player.flush()

    def _restart_queue(self) -> None:
        """A fresh queue for the new run_live: the old one is closed, and caller audio from
        the outage is not worth sending to a model that has moved on."""
        old, self.live_queue = self.live_queue, CallerAudioQueue()
        old.close()
        self._generating = self._discarding = False
        self._awaiting_reply_since = None

    async def end_with(self, mulaw: bytes, reason: str) -> None:
        """Plays a last message to the caller (instead of anything the agent had queued), then
        ends the call once it has been heard."""
        self._ending = True
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
        self.end(reason)

    async def _on_model_event(self, event: Event) -> None:
        if self.recorder is not None:
            self.recorder.model_event(event)
        if event.content and event.content.parts:
            for part in event.content.parts:
                blob = part.inline_data
                if blob and blob.data and (blob.mime_type or "").startswith("audio/pcm"):
                    self._on_agent_audio(blob.data, blob.mime_type or "")
        if event.input_transcription and event.input_transcription.finished:
            self._log("caller said: %s", self._words(event.input_transcription.text or ""))
        if event.output_transcription and event.output_transcription.finished:
            self._log("agent said: %s", self._words(event.output_transcription.text or ""))
        if event.interrupted:
            self._log("model reports the caller interrupted it")
            await self._barge_in("model interrupted")
            self._end_turn()
        elif event.turn_complete:
            self._end_turn()

    def _on_agent_audio(self, pcm: bytes, mime_type: str) -> None:
        if self._discarding or self._ending:
            return
        if mime_type.replace(" ", "") != AGENT_AUDIO_MIME:
            self._log("dropped agent audio in unexpected format %s", mime_type, level=logging.ERROR)
            return
        self._generating = True
        self.player.enqueue(self._outbound.convert(pcm))

    def _end_turn(self) -> None:
        self._generating = False
        self._discarding = False

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._log("task %s failed: %r", task.get_name(), task.exception(), level=logging.ERROR)
        self.end(f"internal error in {task.get_name()}")

    def end(self, reason: str) -> None:
        """Marks the call over, whoever ends it (the socket handler then hangs up)."""
        if not self.end_reason:
            self.end_reason = reason
        self.done.set()

    async def close(self, reason: str) -> None:
        """Ends the call and everything it owns; safe to call any number of times."""
        self.end(reason)
        if self._closing is None:
            self._closing = asyncio.create_task(self._shutdown())
        await asyncio.shield(self._closing)

    async def _shutdown(self) -> None:
        self.live_queue.close()
        try:
            await self._end_tasks()
        finally:
            if self.recorder is not None:
                self.recorder.close(self.end_reason)
        ledger = self.player.ledger
        self._log(
            "ended: %s; agent audio sent %.1f s, barge-ins %d, marks sent %d played %d "
            "cleared %d; dropped: caller audio %.1f s, agent audio %.1f s",
            self.end_reason,
            ledger.sent_bytes / 8000,
            self.barge_ins,
            ledger.marks_sent,
            ledger.marks_played,
            ledger.marks_cleared,
            self.caller_audio_dropped * 0.02,
            self.player.overflow_bytes / 8000,
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
