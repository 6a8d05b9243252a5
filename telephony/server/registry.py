"""The calls this process is serving, keyed by call SID.

The webhook pre-starts a call (so its live session warms up while Twilio opens the stream);
the media stream then claims it. A pre-started call whose stream never arrives is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from google.adk.events import Event

from ..call import Call, CallInfo, Handover, Outcome
from .metrics import Metrics

__all__ = ["CallRegistry"]

log = logging.getLogger(__name__)

FINAL_STATUSES = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})
"""Twilio's call statuses that say a call is over."""
HANDOVER_KEEP_S = 60.0
"""How long an ended call's handover waits for Twilio to ask for it (`take_handover`), and
how long a stream for it is refused."""


class CallRegistry:
    def __init__(
        self,
        factory: Callable[[CallInfo], Call],
        *,
        connect_timeout_s: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._factory = factory
        self.metrics = metrics or Metrics()
        self._timeout = connect_timeout_s
        self._calls: dict[str, Call] = {}
        self._attached: set[str] = set()
        self._expiries: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        """Shutting down: the webhook turns new calls away."""
        self._emptied = asyncio.Event()
        self._handovers: dict[str, Handover] = {}
        """Handovers of calls that ended, until Twilio asks what to do next."""
        self._ended: dict[str, asyncio.TimerHandle] = {}
        """Calls that ended here lately, each with the timer that forgets it."""
        self._callers: dict[str, str] = {}
        """Who each call that ended here lately was with (its session's user id), for Twilio's
        last callbacks, which do not say."""
        self._early: dict[str, list[Event]] = {}
        """Facts for the history of outbound calls not started yet (Twilio's callbacks)."""
        self._answered: set[str] = set()
        """Outbound calls (of `_outbound`) that started here."""
        self.placing = 0
        """Outbound calls being created (Twilio's REST API has not answered yet)."""
        self._outbound: dict[str, asyncio.TimerHandle] = {}
        """Outbound calls Twilio has created and not reported over, each with the timer that
        forgets it should that report never come."""
        self._reported_over: dict[str, asyncio.Future[str]] = {}
        """Outbound calls' ends, as Twilio reports them, for whoever waits on one."""

    def __len__(self) -> int:
        return len(self._calls)

    def get(self, call_sid: str) -> Call | None:
        return self._calls.get(call_sid)

    def active(self) -> list[Call]:
        """The calls in progress (pre-started ones included)."""
        return list(self._calls.values())

    def prestart(self, info: CallInfo) -> Call:
        """Called by the webhook: start the live session before the stream exists."""
        call = self._calls.get(info.call_sid)
        if call is not None:
            return call
        call = self._new(info)
        self._expiries[info.call_sid] = asyncio.get_running_loop().call_later(
            self._timeout, self._expire, call
        )
        return call

    def claim(self, info: CallInfo) -> Call | None:
        """Called when a media stream starts: the pre-started call, or a fresh one. A second
        stream for a call that already has one replaces it (Twilio reconnected): the same call
        goes on over it, its conversation and live session intact. None for a call that ended
        here (e.g. while Twilio pressed keys for it): it must not start again."""
        if info.call_sid in self._ended:
            return None
        call = self._calls.get(info.call_sid)
        if call is not None and call.stream_released:
            log.info("call %s: a new media stream after the keys", info.call_sid)
        elif call is not None and info.call_sid in self._attached:
            log.warning("call %s: a second media stream replaces the first", info.call_sid)
        if call is None:
            call = self._new(info)
        self._attached.add(info.call_sid)
        self._cancel_expiry(info.call_sid)
        return call

    def _cancel_expiry(self, call_sid: str) -> None:
        """The timer holds the call: let it go as soon as it is not needed."""
        if (timer := self._expiries.pop(call_sid, None)) is not None:
            timer.cancel()

    def _new(self, info: CallInfo) -> Call:
        call = self._factory(info)
        self._emptied.clear()
        self._calls[info.call_sid] = call
        if info.call_sid in self._outbound:
            self._answered.add(info.call_sid)
        for event in self._early.pop(info.call_sid, []):
            call.record.append(event)
        call.start()
        self.spawn(self._reap(call))
        return call

    @property
    def outbound(self) -> int:
        """Outbound calls being placed, ringing or in progress."""
        return self.placing + len(self._outbound)

    def placed(self, call_sid: str, forget_after_s: float) -> None:
        """Twilio created an outbound call: it counts until Twilio reports it over (or, should
        that report be lost, for `forget_after_s`)."""
        timer = asyncio.get_running_loop().call_later(forget_after_s, self._over, call_sid)
        self._outbound[call_sid] = timer
        self._reported_over[call_sid] = asyncio.get_running_loop().create_future()

    async def outbound_over(self, call_sid: str) -> str:
        """Waits for Twilio to report the outbound call `call_sid` over (which may be long
        after its stream ended for a transfer) and returns how, e.g. `completed after 42 s`."""
        if (over := self._reported_over.get(call_sid)) is None:
            return "not placed from here, or over already"
        return await asyncio.shield(over)

    def status(self, call_sid: str, status: str) -> list[Event]:
        """A status callback from Twilio (call progress or the media stream's). Returns the
        facts kept (`keep`) for an outbound call that Twilio reports over before it started
        here (not answered, busy...): its history has no session yet."""
        log.info("call %s: Twilio reports %s", call_sid, status)
        if status.split()[0] not in FINAL_STATUSES:
            return []
        if (call := self._calls.get(call_sid)) is not None:  # e.g. hung up during the keys
            call.end(f"Twilio reports the call {status}", Outcome.HUNG_UP)
        return self._over(call_sid, status)

    def keep(self, call_sid: str, event: Event) -> bool:
        """A fact for the call's history (see `call.record`): the call appends it to its
        session, or, placed and not answered yet, once it starts. False: the call is not here."""
        if (call := self._calls.get(call_sid)) is not None:
            call.record.append(event)
            return True
        if call_sid in self._outbound and call_sid not in self._answered:
            self._early.setdefault(call_sid, []).append(event)
            return True
        return False

    def caller_of(self, call_sid: str) -> str:
        """The user id of a call here or ended here lately ("" if neither)."""
        if (call := self._calls.get(call_sid)) is not None:
            return call.info.caller or "unknown"
        return self._callers.get(call_sid, "")

    def _over(self, call_sid: str, status: str = "never reported over by Twilio") -> list[Event]:
        if (timer := self._outbound.pop(call_sid, None)) is not None:
            timer.cancel()
        if (over := self._reported_over.pop(call_sid, None)) is not None and not over.done():
            over.set_result(status)
        self._answered.discard(call_sid)
        return self._early.pop(call_sid, [])

    def take_handover(self, call_sid: str) -> Handover | None:
        """What Twilio should do with a call whose stream we let go (None: hang up)."""
        call = self._calls.get(call_sid)
        if call is not None and call.stream_released and call.handover is not None:
            handover, call.handover = call.handover, None
            return handover
        return self._handovers.pop(call_sid, None)

    async def _reap(self, call: Call) -> None:
        await call.done.wait()
        sid = call.info.call_sid
        loop = asyncio.get_running_loop()
        self._ended[sid] = loop.call_later(HANDOVER_KEEP_S, self._forget_ended, sid)
        self._callers[sid] = call.info.caller or "unknown"
        if call.handover is not None:  # before the socket closes and Twilio asks for it
            self._handovers[sid] = call.handover
            loop.call_later(HANDOVER_KEEP_S, self._handovers.pop, sid, None)
        await call.close(call.end_reason, call.outcome or Outcome.INTERNAL_ERROR)
        # in one step, so that a scrape counts the call either as running or as ended
        self._forget(call)
        self.metrics.ended(call)

    def _forget_ended(self, call_sid: str) -> None:
        self._ended.pop(call_sid, None)
        self._callers.pop(call_sid, None)

    def _forget(self, call: Call) -> None:
        if self._calls.get(call.info.call_sid) is call:
            del self._calls[call.info.call_sid]
            self._attached.discard(call.info.call_sid)
            self._cancel_expiry(call.info.call_sid)
        if not self._calls:
            self._emptied.set()

    def _expire(self, call: Call) -> None:
        self._expiries.pop(call.info.call_sid, None)
        if self._calls.get(call.info.call_sid) is call and call.info.call_sid not in self._attached:
            log.warning(
                "call %s: no media stream within %.0f s; ending it",
                call.info.call_sid,
                self._timeout,
            )
            self.spawn(call.close("media stream never connected", Outcome.NO_STREAM))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Runs `coro` as a task that `close_all` waits for."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Waits for the last call to end; False if some are still on after `timeout_s`."""
        if self._calls:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._emptied.wait()
        return not self._calls

    async def drain(self, timeout_s: float, goodbye: bytes) -> None:
        """Turns new calls away, lets the active ones finish for up to `timeout_s`, then says
        `goodbye` to those still talking and ends them."""
        self.draining = True
        log.info("draining: %d active call(s), waiting up to %.0f s", len(self), timeout_s)
        await self.wait_idle(timeout_s)
        remaining = list(self._calls.values())
        if remaining:
            log.info("drain time is up: saying goodbye to %d call(s)", len(remaining))
            await asyncio.gather(
                *(
                    call.end_with(goodbye, "server shutting down", Outcome.SHUTDOWN)
                    for call in remaining
                )
            )
        await self.close_all("server shutting down")

    async def close_all(self, reason: str) -> None:
        """Ends every call at once: the server is shutting down."""
        calls = list(self._calls.values())
        await asyncio.gather(*(call.close(reason, Outcome.SHUTDOWN) for call in calls))
        await asyncio.gather(*self._tasks, return_exceptions=True)
