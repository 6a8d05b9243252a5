"""The live supervisor against ADK's real live flow and a scripted model, on a virtual clock:
handles kept across non-resumable updates, unanswered input sent again after a reconnect,
restarts that resume and back off, and the connection budget."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import pytest
from google.adk.agents import LlmAgent
from google.adk.agents.run_config import RunConfig
from google.adk.apps import App
from google.adk.models import BaseLlm, LlmRequest, LlmResponse
from google.adk.models.base_llm_connection import BaseLlmConnection
from google.adk.plugins import BasePlugin
from google.adk.runners import Runner
from google.adk.sessions import InMemorySessionService
from google.genai import types
from pydantic import PrivateAttr
from websockets.exceptions import ConnectionClosedError
from websockets.frames import Close

from telephony.agents.echo import echo_app
from telephony.call import Call, CallInfo, CallOptions
from telephony.call.logs import CallLogger
from telephony.call.supervisor import (
    CALLER_BACKLOG_LIMIT,
    CALLER_BATCH_BYTES,
    HandleKeeper,
    LiveSupervisor,
    ReconnectsExhausted,
)
from telephony.call.turns import AGENT_AUDIO, CallerSpeechEnded
from telephony.testing.virtual_clock import run_virtual

T = TypeVar("T")
MAX_CONNECTIONS = 50
"""The scripted model refuses connections beyond this, so a loop that never stops fails."""


@dataclass
class Connection:
    """What one connection was opened with and sent: audio bytes and text turns, in order."""

    handle: str | None
    history: list[types.Content]
    opened_at: float
    sent: list[bytes | str] = field(default_factory=list)


Script = Callable[["ScriptedConnection"], AsyncIterator[LlmResponse]]


class ScriptedConnection(BaseLlmConnection):
    """Plays its script once, then stays open (silent) until closed."""

    def __init__(self, record: Connection, script: Script) -> None:
        self.record = record
        self._script: Script | None = script
        self._closed = asyncio.Event()

    async def sent(self, count: int) -> None:
        """Waits until the model has received `count` pieces of input."""
        while len(self.record.sent) < count:
            await asyncio.sleep(0.01)

    async def send_history(self, history: list[types.Content]) -> None:
        self.record.history = list(history)

    async def send_content(self, content: types.Content) -> None:
        self.record.sent.append("".join(p.text or "" for p in content.parts or []))

    async def send_realtime(self, blob: types.Blob) -> None:  # type: ignore[override]
        if isinstance(blob, types.Blob) and blob.data:
            self.record.sent.append(blob.data)

    async def receive(self) -> AsyncIterator[LlmResponse]:  # type: ignore[override]
        script, self._script = self._script, None
        if script is not None:
            async for response in script(self):
                yield response
        await self._closed.wait()

    async def close(self) -> None:
        self._closed.set()


class ScriptedLlm(BaseLlm):
    """Connection N plays script N (the last one plays for all further connections)."""

    model: str = "scripted-live"
    _scripts: list[Script] = PrivateAttr(default_factory=list)
    _connections: list[Connection] = PrivateAttr(default_factory=list)

    @property
    def connections(self) -> list[Connection]:
        return self._connections

    async def generate_content_async(
        self, llm_request: LlmRequest, stream: bool = False
    ) -> AsyncIterator[LlmResponse]:
        raise NotImplementedError("live only")
        yield  # pragma: no cover

    @contextlib.asynccontextmanager
    async def connect(self, llm_request: LlmRequest) -> AsyncIterator[BaseLlmConnection]:
        if len(self._connections) >= MAX_CONNECTIONS:
            raise RuntimeError("too many connections")
        config = llm_request.live_connect_config
        resumption = config.session_resumption if config else None
        record = Connection(
            handle=resumption.handle if resumption else None,
            history=[],
            opened_at=asyncio.get_running_loop().time(),
        )
        self._connections.append(record)
        script = self._scripts[min(len(self._connections), len(self._scripts)) - 1]
        connection = ScriptedConnection(record, script)
        try:
            yield connection
        finally:
            await connection.close()


def update(handle: str | None) -> LlmResponse:
    """A resumable update with `handle`, or (None) the non-resumable one sent mid-reply."""
    return LlmResponse(
        live_session_resumption_update=types.LiveServerSessionResumptionUpdate(
            new_handle=handle, resumable=handle is not None
        )
    )


def go_away() -> LlmResponse:
    return LlmResponse(go_away=types.LiveServerGoAway(time_left="1s"))


def audio() -> LlmResponse:
    part = types.Part(inline_data=types.Blob(data=bytes(960), mime_type="audio/pcm;rate=24000"))
    return LlmResponse(content=types.Content(role="model", parts=[part]), partial=True)


def drop() -> NoReturn:
    raise ConnectionClosedError(Close(1011, "dropped"), None)


async def silent(connection: ScriptedConnection) -> AsyncIterator[LlmResponse]:
    return
    yield  # pragma: no cover


@dataclass
class Harness:
    model: ScriptedLlm
    owed: bool
    """What the call answers when told of a reconnect."""
    reconnects: int = 0
    supervisor: LiveSupervisor = field(init=False)

    def on_reconnect(self) -> bool:
        self.reconnects += 1
        return self.owed

    @property
    def connections(self) -> list[Connection]:
        return self.model.connections

    async def opened(self, count: int) -> list[Connection]:
        while len(self.connections) < count:
            await asyncio.sleep(0.01)
        return self.connections


def harness(*scripts: Script, owed: bool = False, restarts: int = 3, budget: int = 6) -> Harness:
    model = ScriptedLlm()
    model._scripts = list(scripts)
    runner = Runner(
        app=App(name="scripted", root_agent=LlmAgent(name="agent", model=model)),
        session_service=InMemorySessionService(),
        auto_create_session=True,
    )
    run_config = RunConfig(
        response_modalities=[types.Modality.AUDIO],
        session_resumption=types.SessionResumptionConfig(),
    )

    async def on_event(event: object, output: bool) -> None:
        pass

    h = Harness(model, owed)
    h.supervisor = LiveSupervisor(
        runner,
        run_config,
        user_id="caller",
        session_id="CA1",
        restarts=restarts,
        connections_per_minute=budget,
        on_event=on_event,
        on_reconnect=h.on_reconnect,
        log=CallLogger("CA1", mask=False),
    )
    return h


def supervised(h: Harness, body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Runs the supervisor around `body` on a virtual clock, then stops it."""

    async def main() -> T:
        run = asyncio.create_task(h.supervisor.run())
        try:
            return await asyncio.wait_for(body(), 60)
        finally:
            h.supervisor.close()
            await asyncio.wait_for(run, 10)

    return run_virtual(main())


FRAMES = [bytes([n]) * 640 for n in (1, 2, 3)]


def speak(h: Harness) -> None:
    for frame in FRAMES:
        h.supervisor.send_caller_audio(frame)


def resent(h: Harness, send: Callable[[], None] | None = None) -> list[object]:
    """What a new connection got once the first one went: `send` (the frames, by default)
    goes to the first."""

    async def body() -> list[object]:
        (send or (lambda: speak(h)))()
        _, new = await h.opened(2)
        await asyncio.sleep(1.0)
        return list(new.sent)

    return supervised(h, body)


@pytest.mark.parametrize("fault", ["go_away", "drop"])
def test_a_reconnect_mid_reply_resumes_with_the_last_resumable_handle(fault: str) -> None:
    """ADK 2.13 would hold the empty handle of the non-resumable update: a fresh session."""

    async def reply_then_fault(connection: ScriptedConnection) -> AsyncIterator[LlmResponse]:
        yield update("h1")
        yield update(None)
        yield audio()
        if fault == "drop":
            drop()
        yield go_away()

    h = harness(reply_then_fault, silent)

    async def body() -> None:
        old, new = await h.opened(2)
        assert (old.handle, new.handle) == (None, "h1")

    supervised(h, body)
    assert (h.supervisor.reconnects, h.supervisor.restarts, h.reconnects) == (1, 0, 1)


def test_a_restart_resumes_with_the_last_resumable_handle() -> None:
    async def fail_mid_reply(connection: ScriptedConnection) -> AsyncIterator[LlmResponse]:
        yield update("h1")
        yield update(None)
        raise RuntimeError("not a drop ADK reconnects after")

    h = harness(fail_mid_reply, silent)

    async def body() -> None:
        _, restarted = await h.opened(2)
        assert restarted.handle == "h1"

    supervised(h, body)
    assert (h.supervisor.reconnects, h.supervisor.restarts) == (1, 1)


def test_a_handle_that_fails_to_resume_gives_way_to_a_fresh_session_with_history() -> None:
    async def fail(connection: ScriptedConnection) -> AsyncIterator[LlmResponse]:
        if connection.record.handle is None:
            yield update("h1")
            await connection.sent(1)
        raise RuntimeError("failed")

    h = harness(fail, fail, silent)

    async def body() -> None:
        h.supervisor.send_text("hello")
        connections = await h.opened(3)
        assert [c.handle for c in connections] == [None, "h1", None]
        assert connections[2].history  # the session so far, as ADK replays it

    supervised(h, body)


def reply_cut_off(*before_fault: LlmResponse, frames: int = 3) -> Script:
    async def script(connection: ScriptedConnection) -> AsyncIterator[LlmResponse]:
        if connection.record.handle is not None:
            return
        yield update("h1")
        await connection.sent(frames)
        for response in before_fault:
            yield response
        yield go_away()

    return script


@pytest.mark.parametrize(
    ("before_fault", "owed", "replayed"),
    [
        ((update(None), audio()), False, FRAMES),  # the model was answering
        ((), True, FRAMES),  # the call says the caller waits for an answer
        ((), False, []),  # nobody is owed anything
        ((update(None), audio(), LlmResponse(turn_complete=True), update("h2")), True, []),
    ],
    ids=["mid-reply", "caller-waiting", "idle", "answered"],
)
def test_a_new_connection_hears_again_what_went_unanswered(
    before_fault: tuple[LlmResponse, ...], owed: bool, replayed: list[bytes]
) -> None:
    h = harness(reply_cut_off(*before_fault), owed=owed)

    assert resent(h) == replayed
    assert h.reconnects == 1


def test_only_input_since_the_last_completed_turn_is_sent_again() -> None:
    answered = asyncio.Event()

    async def script(connection: ScriptedConnection) -> AsyncIterator[LlmResponse]:
        if connection.record.handle is not None:
            return
        yield update("h1")
        await connection.sent(2)
        yield update(None)
        yield LlmResponse(turn_complete=True)
        answered.set()  # ADK has handled the turn's end before it asks for more
        await connection.sent(3)
        yield update(None)
        yield audio()
        yield go_away()

    h = harness(script)

    async def body() -> None:
        h.supervisor.send_caller_audio(FRAMES[0])
        h.supervisor.send_caller_audio(FRAMES[1])
        await answered.wait()
        h.supervisor.send_caller_audio(FRAMES[2])
        _, new = await h.opened(2)
        await asyncio.sleep(1.0)
        assert new.sent == FRAMES[2:]

    supervised(h, body)


def test_an_interrupted_turn_leaves_the_input_unanswered() -> None:
    async def script(connection: ScriptedConnection) -> AsyncIterator[LlmResponse]:
        if connection.record.handle is not None:
            return
        yield update("h1")
        await connection.sent(2)
        yield update(None)
        yield LlmResponse(interrupted=True)
        yield LlmResponse(turn_complete=True)
        await connection.sent(3)
        yield update(None)
        yield go_away()

    h = harness(script)

    assert resent(h) == FRAMES


def test_an_unanswered_text_turn_is_sent_again() -> None:
    """The greeting: the model owes a reply to every text turn."""
    h = harness(reply_cut_off(frames=1))

    assert resent(h, lambda: h.supervisor.send_text("(Greet the caller.)")) == [
        "(Greet the caller.)"
    ]


def test_a_restart_sends_the_unanswered_input_to_the_new_session() -> None:
    async def script(connection: ScriptedConnection) -> AsyncIterator[LlmResponse]:
        if connection.record.handle is not None:
            return
        yield update("h1")
        await connection.sent(3)
        yield update(None)
        raise RuntimeError("failed mid-reply")

    h = harness(script)

    assert resent(h) == FRAMES
    assert h.supervisor.restarts == 1


def test_accepting_then_dropping_ends_the_run_once_the_budget_is_spent() -> None:
    """ADK 2.13 reconnects at once and resets its attempt count on every connection."""

    async def accept_then_drop(connection: ScriptedConnection) -> AsyncIterator[LlmResponse]:
        yield update(f"h{id(connection)}")
        drop()

    h = harness(accept_then_drop, budget=3)

    async def main() -> BaseException | None:
        return await asyncio.wait_for(h.supervisor.run(), 60)

    error = run_virtual(main())
    assert isinstance(error, ReconnectsExhausted)
    assert len(h.connections) == 4
    assert h.supervisor.reconnects == 3


def test_restarts_back_off_exponentially_up_to_a_cap() -> None:
    async def fail(connection: ScriptedConnection) -> AsyncIterator[LlmResponse]:
        raise RuntimeError("failed")
        yield  # pragma: no cover

    h = harness(fail, restarts=6, budget=100)

    async def main() -> BaseException | None:
        return await asyncio.wait_for(h.supervisor.run(), 60)

    error = run_virtual(main())
    assert isinstance(error, RuntimeError)
    opened = [c.opened_at for c in h.connections]
    gaps = [b - a for a, b in zip(opened, opened[1:], strict=False)]
    assert gaps == pytest.approx([0.25, 0.5, 1.0, 2.0, 4.0, 4.0], abs=0.02)


def test_the_handle_keeper_runs_first_and_once_per_runner() -> None:
    class Answering(BasePlugin):
        async def on_event_callback(self, **kwargs: object) -> None:
            return None

    runner = Runner(
        app=App(name="echo", root_agent=echo_app().root_agent, plugins=[Answering("user")]),
        session_service=InMemorySessionService(),
    )
    for _ in range(2):
        HandleKeeper.install(runner)
    assert [p.name for p in runner.plugin_manager.plugins] == [HandleKeeper.NAME, "user"]


def test_a_reconnect_ends_the_agents_turn_and_says_whether_the_caller_waits() -> None:
    async def main() -> list[tuple[bool, bool]]:
        runner = Runner(app=echo_app(), session_service=InMemorySessionService())
        call = Call(
            CallInfo("CA1", "+1", "+2"),
            runner=runner,
            run_config=RunConfig(),
            options=CallOptions(),
        )
        outcomes = [(call._on_reconnect(), call.turns.generating)]
        call.turns.handle(AGENT_AUDIO)
        outcomes.append((call._on_reconnect(), call.turns.generating))
        call.turns.handle(CallerSpeechEnded(1.0))
        outcomes.append((call._on_reconnect(), call.turns.awaiting_reply_since is not None))
        return outcomes

    # the caller still waits for an answer after it: the stall watch stays armed
    assert run_virtual(main()) == [(False, False), (True, False), (True, True)]


def test_a_full_backlog_keeps_the_newest_caller_audio_and_every_text_turn() -> None:
    """The model stopped reading: each new frame pushes out the oldest waiting frame, never a
    text turn (a key press, a note) or a control request."""

    async def main() -> tuple[list[object], int]:
        h = harness()
        supervisor = h.supervisor
        supervisor.send_text("4207#")
        for n in range(CALLER_BACKLOG_LIMIT + 50):
            supervisor.send_caller_audio(n.to_bytes(2, "little") * 320)
        supervisor.queue.send_audio_stream_end()
        waiting = []
        while not supervisor.queue._queue.empty():
            request = supervisor.queue._queue.get_nowait()
            if request.blob is not None:
                waiting.append(int.from_bytes(request.blob.data[:2], "little"))
            else:
                waiting.append(request.content or request.audio_stream_end)
        return waiting, supervisor.caller_audio_dropped

    waiting, dropped = run_virtual(main())
    assert dropped == 50  # the limit is on audio: the text turn is never dropped
    assert isinstance(waiting[0], types.Content)
    assert waiting[1:-1] == list(range(50, CALLER_BACKLOG_LIMIT + 50))
    assert waiting[-1] is True


def test_caller_audio_held_back_goes_before_what_adk_sends_itself() -> None:
    """ADK puts a tool's response on the queue itself (`send_content`): the caller audio held
    for a batch was spoken before it, and must reach the model first."""
    supervisor = harness().supervisor
    supervisor.send_caller_audio(FRAMES[0], gather=CALLER_BATCH_BYTES)
    response = types.Content(role="user", parts=[types.Part(text="the tool's response")])
    supervisor.queue.send_content(response)
    waiting = [supervisor.queue._queue.get_nowait() for _ in range(2)]
    assert [r.blob.data if r.blob else r.content for r in waiting] == [FRAMES[0], response]
