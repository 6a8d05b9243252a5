"""A call's dealings with `Runner.run_live`: the live session, its input queue, and what to
do when its connection fails.

ADK reconnects by itself after a go_away, and after a drop while it holds a resumption handle;
anything else ends `run_live` with an error, and the supervisor restarts it on the same ADK
session (resuming the model's session with the last handle when there is one). A model that went
quiet is restarted the same way (`restart`). Three quirks of ADK 2.13 are absorbed here:

- It keeps the empty handle of every non-resumable update, sent while the model generates, so a
  reconnect mid-reply would open a fresh session with no context. `HandleKeeper` puts the last
  resumable handle back.
- A reconnect drops the reply in progress without a word, and a new connection answers neither
  what it never heard nor replayed history. When the call says the caller is owed an answer
  (`on_reconnect`) or the model was answering, what was sent since the model last completed a
  turn goes to the new connection again.
- Its reconnects are immediate and unbounded. Every connection, ADK's or ours, counts against a
  per-minute budget; restarts back off exponentially; a spent budget ends the call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from google.adk.agents import BaseAgent
from google.adk.agents.callback_context import CallbackContext
from google.adk.agents.invocation_context import InvocationContext
from google.adk.agents.live_request_queue import LiveRequest, LiveRequestQueue
from google.adk.agents.run_config import RunConfig
from google.adk.events import Event
from google.adk.plugins import BasePlugin
from google.adk.runners import Runner
from google.adk.sessions import BaseSessionService, Session
from google.adk.sessions.base_session_service import GetSessionConfig
from google.genai import types

from .logs import CallLogger
from .previous import PREVIOUS_CALLS_KEY, STARTED_KEY, previous_calls

__all__ = [
    "CALLER_AUDIO_MIME",
    "CALLER_BACKLOG_LIMIT",
    "CALLER_BATCH_BYTES",
    "CALLER_FRAME_BYTES",
    "CONNECTION_WINDOW_S",
    "NOTE_METADATA_KEY",
    "REPLAY_AUDIO_S",
    "RESTART_BACKOFF_CAP_S",
    "RESTART_BACKOFF_S",
    "CallerAudioQueue",
    "HandleKeeper",
    "LiveSupervisor",
    "ModelStalled",
    "ReconnectsExhausted",
    "is_model_output",
]

CALLER_AUDIO_MIME = "audio/pcm;rate=16000"
CALLER_BACKLOG_LIMIT = 250
"""20 ms frames of caller audio (5 s) waiting for the model beyond which the oldest caller
audio is dropped."""
CALLER_FRAME_BYTES = 640
"""20 ms of caller audio as the model gets it (16 kHz PCM16)."""
CALLER_BATCH_BYTES = 10 * CALLER_FRAME_BYTES
"""Caller audio that may wait goes to the model once this much (200 ms) has gathered (see
`send_caller_audio`). Each request costs the model's client a message whatever its size (a
pydantic blob, JSON, base64, a WebSocket frame, TLS) and ADK's live flow a queue hop: sent per
20 ms frame, that was the largest cost of a call on the real path."""
PREVIOUS_CALLS_TIMEOUT_S = 2.0
"""How long a new call's session waits for the caller's earlier calls to be read."""
REPLAY_AUDIO_S = 10.0
"""At most this much of the caller's latest audio is sent again to a new connection."""
CONNECTION_WINDOW_S = 60.0
"""The window of the connection budget (`connections_per_minute`)."""
RESTART_BACKOFF_S = 0.25
RESTART_BACKOFF_CAP_S = 4.0
"""A restart waits RESTART_BACKOFF_S, doubled for each other connection within the window, up
to this."""
_CALLER_AUDIO_BYTES_PER_S = 32000
NOTE_METADATA_KEY = "telephony_note"
"""The custom metadata key of a note's session event (see `LiveSupervisor.send_note`)."""


class ModelStalled(RuntimeError):
    """The live session went silent while the caller waited for an answer."""


class ReconnectsExhausted(RuntimeError):
    """The live connection was opened more often than the budget allows: the service keeps
    accepting and dropping it."""


class HandleKeeper(BasePlugin):
    """Keeps ADK holding the last resumable handle of a supervised call.

    ADK 2.13 stores the handle of every `sessionResumptionUpdate`, including the empty one of a
    non-resumable update; a go_away or drop mid-reply then reconnects to a fresh session. A
    plugin's `on_event_callback` runs in ADK's event path before the flow reads the next
    message, so the handle is back before any reconnect can read it. It must be put back on the
    agent's own context, a copy of the one plugins get with events: `before_agent_callback`
    finds it.
    """

    NAME = "telephony_resumption_handle"

    def __init__(self) -> None:
        super().__init__(name=self.NAME)

    @classmethod
    def install(cls, runner: Runner) -> None:
        """Once per runner, first (a plugin that answers a callback stops the ones after it);
        it acts only on invocations fed by a `CallerAudioQueue`."""
        if runner.plugin_manager.get_plugin(cls.NAME) is None:
            runner.plugin_manager.plugins.insert(0, cls())

    async def before_agent_callback(
        self, *, agent: BaseAgent, callback_context: CallbackContext
    ) -> types.Content | None:
        context = callback_context._invocation_context  # what ADK's live flow runs with
        queue = context.live_request_queue
        if isinstance(queue, CallerAudioQueue):
            queue.agent_context = context
        return None

    async def on_event_callback(
        self, *, invocation_context: InvocationContext, event: Event
    ) -> Event | None:
        queue = invocation_context.live_request_queue
        if isinstance(queue, CallerAudioQueue):
            handle = queue.owner.observe(event)
            if event.live_session_resumption_update is not None and queue.agent_context:
                queue.agent_context.live_session_resumption_handle = handle
        return None


def is_model_output(event: Event) -> bool:
    """The model said something: audio, its own transcript, or a tool call. Only this shows a
    live session is working; a stalled one still sends resumption updates and transcribes the
    caller."""
    if event.output_transcription and event.output_transcription.text:
        return True
    parts = event.content.parts if event.content else None
    return any(
        (part.inline_data is not None and bool(part.inline_data.data)) or part.function_call
        for part in parts or ()
    )


class CallerAudioQueue(LiveRequestQueue):
    """The queue ADK reads caller input from, as its supervisor sees it.

    ADK never pushes back: when the model stops reading (a stall, a reconnect), only the newest
    5 s of caller audio wait for it, the oldest piece making room for each new one, so the
    model comes back to what the caller says now (the end of a question, an answer) rather than
    to what they said while nobody listened. Requests to replay are served before the backlog.

    ADK reports no reconnect, but each connection that lives long enough reads this queue from
    a sender task of its own, and ADK asks `closed` after every failed connection before it
    reconnects: between them, each connection of the run is seen (one that fails unread right
    after a go_away excepted).
    """

    def __init__(self, owner: LiveSupervisor) -> None:
        super().__init__()
        self.owner = owner
        self.agent_context: InvocationContext | None = None
        """The context of the agent reading this queue (its reconnects read the handle there)."""
        self._replay: deque[LiveRequest] = deque()
        self._notes: deque[tuple[LiveRequest, dict[str, Any]]] = deque()
        """Notes waiting in the queue, in order, with what to store with each."""
        self._waiting_audio = 0
        """Bytes of caller audio in the queue."""
        self._sender: asyncio.Task[Any] | None = None
        self._sender_connection = 0
        """Which of the run's connections (from 1) `_sender` reads for."""
        self._ended = 0
        """The run's connections known to have ended."""
        self._counted = 1
        """The run's connections counted against the budget (the first when the run starts)."""

    @property
    def closed(self) -> bool:
        """Also ADK's question after a failed connection: reconnect? Not on a spent budget."""
        if super().closed:
            return True
        self._ended = self._current()
        return self.owner.exhausted

    def offer(self, blob: types.Blob) -> int:
        """Queues caller audio; returns how many bytes of the oldest waiting audio had to
        make room for it."""
        size = len(blob.data or b"")
        dropped = 0
        while self._waiting_audio + size > CALLER_BACKLOG_LIMIT * CALLER_FRAME_BYTES:
            if not (oldest := self._drop_oldest_audio()):
                break
            dropped += oldest
        self._waiting_audio += size
        self.send_realtime(blob)
        return dropped

    def _drop_oldest_audio(self) -> int:
        """Drops the oldest caller audio waiting; text turns and control requests all stay,
        in order. Returns the bytes dropped."""
        waiting = [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        oldest = next((i for i, r in enumerate(waiting) if r.blob is not None), None)
        size = 0
        if oldest is not None:
            size = len(waiting.pop(oldest).blob.data or b"")  # type: ignore[union-attr]
            self._waiting_audio -= size
        for request in waiting:
            self._queue.put_nowait(request)
        return size

    def replay(self, requests: Iterable[LiveRequest]) -> None:
        """Sends these first (instead of any replay not sent yet: `requests` holds it too)."""
        self._replay = deque(requests)

    async def get(self) -> LiveRequest:
        sender = asyncio.current_task()
        if sender is not self._sender:
            if self._sender is not None and self._sender_connection > self._ended:
                self._ended = self._sender_connection  # it went without failing: a go_away
            self._sender = sender
            self._sender_connection = self._current()
            if self._sender_connection > 1:
                self.owner.reopened(self)
        if self._replay:
            return self._replay.popleft()
        request = await super().get()
        if request.blob is not None:
            self._waiting_audio -= len(request.blob.data or b"")
        if self._notes and request is self._notes[0][0]:
            await self._store(request, self._notes.popleft()[1])
        self.owner.sent(request)
        return request

    def send_content(self, content: types.Content, partial: bool = False) -> None:
        """Also how ADK sends a tool's response: the caller audio held back goes first."""
        self.owner.send_caller_audio(b"")
        super().send_content(content, partial)

    def send_note(self, request: LiveRequest, record: dict[str, Any]) -> None:
        self._notes.append((request, record))
        self.send(request)

    async def _store(self, note: LiveRequest, record: dict[str, Any]) -> None:
        """ADK stores no partial turn; a note belongs in the history all the same (a restart
        without a resumption handle rebuilds the model's context from it). Stored from ADK's
        sender, on the session object its live flow appends to, as ADK stores text turns."""
        context = self.agent_context
        if context is None:
            return
        event = Event(
            invocation_id=context.invocation_id,
            author="user",
            content=note.content,
            custom_metadata={NOTE_METADATA_KEY: record},
        )
        try:
            await context.session_service.append_event(session=context.session, event=event)
        except Exception as exc:  # the note still reaches the model; only the record is lost
            self.owner.note_not_stored(exc)

    def _current(self) -> int:
        """The connection in progress, counted against the budget the first time it is seen."""
        current = self._ended + 1
        if current > self._counted:
            self._counted = current
            self.owner.reconnected()
        return current


class LiveSupervisor:
    """Runs one call's live session until it ends by itself, fails for good or is stopped."""

    def __init__(
        self,
        runner: Runner,
        run_config: RunConfig,
        *,
        user_id: str,
        session_id: str,
        state: dict[str, Any] | None = None,
        restarts: int,
        connections_per_minute: int,
        previous_calls: int = 0,
        on_event: Callable[[Event, bool], Awaitable[None]],
        on_reconnect: Callable[[], bool],
        log: CallLogger,
    ) -> None:
        """`on_reconnect` is told that a new connection replaced the old one, whose turn ended
        without a word; it answers whether the caller is owed an answer."""
        if connections_per_minute < 1:
            raise ValueError("connections_per_minute must be at least 1")
        HandleKeeper.install(runner)
        self._runner = runner
        self._run_config = run_config
        self._user_id = user_id
        self._session_id = session_id
        self._state = state or {}
        """The session's state when the call creates it (the caller's facts)."""
        self._restarts = restarts
        self._budget = connections_per_minute
        self._previous = previous_calls
        """How many of the caller's earlier calls the new session starts with."""
        self._on_event = on_event
        self._on_reconnect = on_reconnect
        self._log = log
        self.queue = CallerAudioQueue(self)
        self._run: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._events = 0
        self._dropping = False
        self._handle: str | None = None
        """The last resumable handle: a restart resumes the model's session with it."""
        self._unanswered: deque[LiveRequest] = deque()
        """Caller input sent since the model last completed a turn (an interrupted one does not
        count), with `_unanswered_audio` bytes of audio. A new connection's first events (its
        resumable handle) come before we see it: they must not count as an answer."""
        self._unanswered_audio = 0
        self._turn_interrupted = False
        self._replying = False
        """The model was answering (its reply may not have reached the call at all)."""
        self._connections: deque[float] = deque()
        """When each connection within the window was opened."""
        self._last_context: InvocationContext | None = None
        """The agent context of the latest run that had one."""
        self.stopped = False
        """The call is over: a run that ends now is not restarted."""
        self.restarts = 0
        self.reconnects = 0
        """Connections opened after the first: ADK's own reconnects and our restarts."""
        self.caller_audio_dropped = 0
        """Caller frames (20 ms) dropped because the model was not reading them."""
        self._held_audio = bytearray()

    def send_caller_audio(self, pcm: bytes, *, gather: int = 0) -> None:
        """`gather`: the model need not hear it before that many bytes of caller audio have
        gathered (up to CALLER_BATCH_BYTES); it goes with what follows, then, or with anything
        else sent before."""
        self._held_audio += pcm
        if len(self._held_audio) < gather:
            return
        pcm = bytes(self._held_audio)
        self._held_audio.clear()
        if not pcm:
            return
        dropped = self.queue.offer(types.Blob(data=pcm, mime_type=CALLER_AUDIO_MIME))
        room = not dropped
        if room == self._dropping:  # dropping starts or stops
            self._dropping = not room
            if room:
                self._log("the model reads caller audio again")
            else:
                self._log(
                    "the model is not reading: dropping the oldest caller audio",
                    level=logging.WARNING,
                )
        self.caller_audio_dropped += dropped // CALLER_FRAME_BYTES

    def end_caller_audio(self) -> None:
        """The caller's audio stopped (`audio_stream_end`), after all of it that was held."""
        self.send_caller_audio(b"")
        self.queue.send_audio_stream_end()

    def send_text(self, text: str) -> None:
        self.send_caller_audio(b"")  # what the caller said first goes first
        self.queue.send_content(types.Content(role="user", parts=[types.Part(text=text)]))

    def send_note(self, text: str, record: dict[str, Any]) -> None:
        """Tells the model something it must not answer (a partial turn: no turn_complete),
        and keeps it in the session's history with `record` as its custom metadata."""
        self.send_caller_audio(b"")
        content = types.Content(role="user", parts=[types.Part(text=text)])
        self.queue.send_note(LiveRequest(content=content, partial=True), record)

    def tell(self, text: str, *, state: dict[str, Any]) -> None:
        """A turn the model answers, with a change to the session state (ADK stores both)."""
        self.send_caller_audio(b"")
        content = types.Content(role="user", parts=[types.Part(text=text)])
        self.queue.send(LiveRequest(content=content, state_delta=state))

    def update_state(self, state: dict[str, Any]) -> None:
        """Changes the session state (ADK stores it as an event of its own); the model is
        told nothing."""
        self.queue.send(LiveRequest(state_delta=state))

    def session(self) -> tuple[BaseSessionService, Session] | None:
        """The session object the live run appends to, for the call's own records (see
        `record`); once the call is over, the last run's. None between runs: a new run
        fetches its own copy, and an append to the old one would make it stale."""
        context = self.queue.agent_context
        if context is None and self.stopped:
            context = self._last_context
        return None if context is None else (context.session_service, context.session)

    async def stored_session(self) -> tuple[BaseSessionService, Session] | None:
        """The call's session as stored, for a call whose live run never got that far."""
        sessions = self._runner.session_service
        session = await sessions.get_session(
            app_name=self._runner.app_name,
            user_id=self._user_id,
            session_id=self._session_id,
            config=GetSessionConfig(num_recent_events=0),  # only appended to
        )
        return None if session is None else (sessions, session)

    def restart(self, reason: str) -> None:
        """Abandons the running live session (it is stuck) for a new one."""
        self._abandon(ModelStalled(reason))

    def observe(self, event: Event) -> str | None:
        """Bookkeeping on each model event, in ADK's order; returns the handle ADK should hold:
        the last resumable one, which a non-resumable update must not erase."""
        update = event.live_session_resumption_update
        if update is not None:
            if update.new_handle and update.resumable is not False:
                self._handle = update.new_handle
            else:  # the service says so while it generates or runs a tool
                self._replying = True
        if event.content is not None:
            self._replying = True
        if event.interrupted:
            self._turn_interrupted = True
        if event.turn_complete:
            if not self._turn_interrupted:
                self._forget_unanswered()
            self._turn_interrupted = False
            self._replying = False
        return self._handle

    def sent(self, request: LiveRequest) -> None:
        """Keeps caller input handed to ADK, for a new connection should the old one go."""
        content = request.content
        if (
            request.close
            or request.partial  # a note, or ADK's own tool streaming: nothing to answer
            or (content and any(p.function_response for p in content.parts or []))
        ):
            return
        self._unanswered.append(request)
        if request.blob is not None and request.blob.data:
            self._unanswered_audio += len(request.blob.data)
        while self._unanswered_audio > REPLAY_AUDIO_S * _CALLER_AUDIO_BYTES_PER_S:
            dropped = self._unanswered.popleft()
            if dropped.blob is not None and dropped.blob.data:
                self._unanswered_audio -= len(dropped.blob.data)

    @property
    def exhausted(self) -> bool:
        """The connection budget is spent: no more reconnects."""
        return isinstance(self._failure, ReconnectsExhausted)

    def note_not_stored(self, exc: Exception) -> None:
        self._log("a note to the model was not stored in the session: %r", exc, level=logging.ERROR)

    def reconnected(self) -> None:
        """ADK opened another connection for the running run_live."""
        self.reconnects += 1
        self._log("ADK reopened the live connection (%d reconnects so far)", self.reconnects)
        if not self._count_connection():
            self._abandon(self._exhausted())

    def reopened(self, queue: CallerAudioQueue) -> None:
        """A new connection reads `queue`: the old one's turn is over; the new one hears again
        what went unanswered."""
        asked = any(request.content is not None for request in self._unanswered)  # a text turn
        owed = self._on_reconnect() or self._replying or asked
        self._turn_interrupted = self._replying = False
        if owed and self._unanswered:
            queue.replay(self._unanswered)
            self._log(
                "sending the new connection the caller's unanswered input again (%.1f s of audio)",
                self._unanswered_audio / _CALLER_AUDIO_BYTES_PER_S,
            )

    async def run(self) -> BaseException | None:
        """Runs the live session, and again when it fails; returns None once it ends by itself
        (or the call stopped it), the last error once it has failed too often in a row (any
        model output in between resets the count) or opened too many connections."""
        await self._create_session()
        failures = 0
        while True:
            if not self._count_connection():
                return self._give_up(self._exhausted())
            self._events = 0
            self._failure = None
            resumed = self._handle
            run = asyncio.create_task(self._run_live(resumed), name=f"live-{self._session_id}")
            self._run = run
            try:
                await asyncio.wait({run})
            except asyncio.CancelledError:
                run.cancel()
                raise
            raised = None if run.cancelled() else run.exception()  # always retrieved
            if self.stopped:
                return None
            # `_failure` is set whenever the run is cancelled, and wins over what the run raised
            error = self._failure if self._failure is not None else raised
            if error is None:
                return None
            if isinstance(error, ReconnectsExhausted):
                return self._give_up(error)
            failures = 1 if self._events else failures + 1
            if failures > self._restarts:
                return self._give_up(error)
            if resumed and not self._events:
                self._handle = None  # it may be what failed: next, a fresh session with history
            delay = min(
                RESTART_BACKOFF_CAP_S, RESTART_BACKOFF_S * 2 ** (len(self._connections) - 1)
            )
            self._log(
                "live session failed (%r); restarting it in %.2f s on the same session, %s "
                "(%d of %d)",
                error,
                delay,
                "resuming the model's session" if self._handle else "with the history",
                failures,
                self._restarts,
                level=logging.WARNING,
            )
            self.restarts += 1
            self.reconnects += 1
            self._new_queue()
            await asyncio.sleep(delay)
            if self.stopped:  # the call ended during the backoff
                return None

    async def _create_session(self) -> None:
        """Creates the call's session with its state, so the agent knows the call from its
        first turn (ADK would create it empty). A session that exists is left as it is."""
        sessions = self._runner.session_service
        key = {
            "app_name": self._runner.app_name,
            "user_id": self._user_id,
            "session_id": self._session_id,
        }
        try:
            if await sessions.get_session(**key) is None:
                state = {STARTED_KEY: time.time(), **self._state}  # the call's own, if given
                # user state: set even when empty, or a summary stored for an earlier call of
                # this number would reach an agent not meant to have it
                state[PREVIOUS_CALLS_KEY] = await self._previous_calls() if self._previous else ""
                await sessions.create_session(**key, state=state)
        except Exception as exc:  # ADK creates it (without the state) when it can
            self._log("session not created: %r", exc, level=logging.ERROR)

    async def _previous_calls(self) -> str:
        """The caller's earlier calls; none when the store is slow or fails (the call goes
        on without them rather than keep the caller waiting for the greeting)."""
        try:
            async with asyncio.timeout(PREVIOUS_CALLS_TIMEOUT_S):
                return await previous_calls(
                    self._runner.session_service,
                    app_name=self._runner.app_name,
                    user_id=self._user_id,
                    session_id=self._session_id,
                    limit=self._previous,
                )
        except Exception as exc:  # noqa: BLE001 - a lesser agent, not a failed call
            self._log("earlier calls not read: %r", exc, level=logging.WARNING)
            return ""

    async def _run_live(self, handle: str | None) -> None:
        run_config = self._run_config
        if handle:  # ADK seeds its reconnects with a handle given here
            resumption = run_config.session_resumption or types.SessionResumptionConfig()
            run_config = run_config.model_copy(
                update={"session_resumption": resumption.model_copy(update={"handle": handle})}
            )
        async for event in self._runner.run_live(
            user_id=self._user_id,
            session_id=self._session_id,
            live_request_queue=self.queue,
            run_config=run_config,
        ):
            output = is_model_output(event)
            self._events += output
            await self._on_event(event, output)

    def _abandon(self, error: BaseException) -> None:
        if self._run is not None and not self._run.done():
            self._failure = error
            self._run.cancel()

    def _count_connection(self) -> bool:
        """Counts a connection now; False once the window holds more than the budget."""
        now = asyncio.get_running_loop().time()
        self._connections.append(now)
        while self._connections[0] <= now - CONNECTION_WINDOW_S:
            self._connections.popleft()
        return len(self._connections) <= self._budget

    def _exhausted(self) -> ReconnectsExhausted:
        return ReconnectsExhausted(
            f"{len(self._connections)} live connections within {CONNECTION_WINDOW_S:.0f} s"
        )

    def _give_up(self, error: BaseException) -> BaseException:
        self._log("live session failed for good: %r", error, level=logging.ERROR)
        return error

    def _forget_unanswered(self) -> None:
        self._unanswered.clear()
        self._unanswered_audio = 0

    def _new_queue(self) -> None:
        """A fresh queue for the new run_live: the old one is closed, and caller audio from
        the outage is not worth sending to a model that has moved on."""
        old, self.queue = self.queue, CallerAudioQueue(self)
        self._last_context = old.agent_context or self._last_context
        old.close()
        self.reopened(self.queue)

    def close(self) -> None:
        self.stopped = True
        self.queue.close()
