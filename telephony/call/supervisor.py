"""A call's dealings with `Runner.run_live`: the live session, its input queue, and what to
do when it fails.

ADK reconnects by itself only in some cases (a go_away; a drop while it holds a resumption
handle); anything else ends `run_live` with an error. The supervisor then restarts it on the
same ADK session, so the transcript so far is kept, a bounded number of times in a row before
the call gives up. A model that went quiet is restarted the same way (`restart`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from google.adk.agents.live_request_queue import LiveRequestQueue
from google.adk.agents.run_config import RunConfig
from google.adk.events import Event
from google.adk.runners import Runner
from google.genai import types

from .logs import CallLogger

__all__ = [
    "CALLER_AUDIO_MIME",
    "CALLER_BACKLOG_LIMIT",
    "CallerAudioQueue",
    "LiveSupervisor",
    "ModelStalled",
]

CALLER_AUDIO_MIME = "audio/pcm;rate=16000"
CALLER_BACKLOG_LIMIT = 250
"""Requests (20 ms frames) waiting for the model beyond which caller audio is dropped."""


class ModelStalled(RuntimeError):
    """The live session went silent while the caller waited for an answer."""


class CallerAudioQueue(LiveRequestQueue):
    """ADK's queue never pushes back. When the model stops reading (a stall, a reconnect),
    caller audio beyond 5 s of backlog is dropped, newest first, rather than piling up:
    what the caller says once the model is back still gets through at once."""

    def offer(self, blob: types.Blob) -> bool:
        if self._queue.qsize() >= CALLER_BACKLOG_LIMIT:
            return False
        self.send_realtime(blob)
        return True


class LiveSupervisor:
    """Runs one call's live session until it ends by itself, fails for good or is stopped."""

    def __init__(
        self,
        runner: Runner,
        run_config: RunConfig,
        *,
        user_id: str,
        session_id: str,
        restarts: int,
        on_event: Callable[[Event], Awaitable[None]],
        on_restart: Callable[[], None],
        log: CallLogger,
    ) -> None:
        self._runner = runner
        self._run_config = run_config
        self._user_id = user_id
        self._session_id = session_id
        self._restarts = restarts
        self._on_event = on_event
        self._on_restart = on_restart
        self._log = log
        self.queue = CallerAudioQueue()
        self._run: asyncio.Task[None] | None = None
        self._events = 0
        self._stalled = ""
        self._dropping = False
        self.stopped = False
        """The call is over: a run that ends now is not restarted."""
        self.restarts = 0
        self.caller_audio_dropped = 0
        """Caller frames dropped because the model was not reading them."""

    def send_caller_audio(self, pcm: bytes) -> None:
        accepted = self.queue.offer(types.Blob(data=pcm, mime_type=CALLER_AUDIO_MIME))
        if accepted == self._dropping:  # dropping starts or stops
            self._dropping = not accepted
            if accepted:
                self._log("the model reads caller audio again")
            else:
                self._log("the model is not reading: dropping caller audio", level=logging.WARNING)
        if not accepted:
            self.caller_audio_dropped += 1

    def send_text(self, text: str) -> None:
        self.queue.send_content(types.Content(role="user", parts=[types.Part(text=text)]))

    def restart(self, reason: str) -> None:
        """Abandons the running live session (it is stuck) for a new one."""
        if self._run is not None and not self._run.done():
            self._stalled = reason
            self._run.cancel()

    async def run(self) -> BaseException | None:
        """Runs the live session, and again when it fails; returns None once it ends by itself
        (or the call stopped it), the last error once it has failed too often in a row. Any
        model event in between resets the count."""
        failures = 0
        while True:
            self._events = 0
            self._stalled = ""
            run = asyncio.create_task(self._run_live(), name=f"live-{self._session_id}")
            self._run = run
            try:
                await asyncio.wait({run})
            except asyncio.CancelledError:
                run.cancel()
                raise
            if self.stopped:
                return None
            error = ModelStalled(self._stalled) if run.cancelled() else run.exception()
            if error is None:
                return None
            failures = 1 if self._events else failures + 1
            if failures > self._restarts:
                self._log("live session failed for good: %r", error, level=logging.ERROR)
                return error
            self._log(
                "live session failed (%r); restarting it on the same session (%d of %d)",
                error,
                failures,
                self._restarts,
                level=logging.WARNING,
            )
            self.restarts += 1
            self._new_queue()
            await asyncio.sleep(0.2 * failures)

    async def _run_live(self) -> None:
        async for event in self._runner.run_live(
            user_id=self._user_id,
            session_id=self._session_id,
            live_request_queue=self.queue,
            run_config=self._run_config,
        ):
            self._events += 1
            await self._on_event(event)

    def _new_queue(self) -> None:
        """A fresh queue for the new run_live: the old one is closed, and caller audio from
        the outage is not worth sending to a model that has moved on."""
        old, self.queue = self.queue, CallerAudioQueue()
        old.close()
        self._on_restart()

    def close(self) -> None:
        self.stopped = True
        self.queue.close()
