"""The caller simulator goes on with a call as Twilio does once the server closes the stream:
the <Connect>'s action, <Play digits>, <Say>, a second <Connect><Stream> for the same call,
<Dial>, <Hangup/>. Against a fake server that only speaks Twilio's side of things: in-process
on a virtual clock (exact and fast), and once over loopback in real time."""

from __future__ import annotations

import asyncio
import contextlib
import json
from base64 import b64decode
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pytest
from quart import Quart, request, websocket

from telephony.audio import mulaw_encode
from telephony.testing.simulator import (
    FRAME_BYTES,
    SILENCE,
    CallerSimulator,
    Echo,
    Interjection,
    Network,
    WebhookError,
    place_call,
)
from telephony.testing.virtual_clock import run_virtual
from telephony.twilio.media_stream import media_message
from telephony.twilio.signatures import SignatureChecker

from .server import serving

T = TypeVar("T")
PUBLIC = "https://voice.example"
TOKEN = "twiml-test-token"
SID = "CA" + "7" * 32
CALL_FORM = {
    "CallSid": SID,
    "AccountSid": "AC" + "0" * 32,
    "From": "+15550001111",
    "To": "+15550002222",
    "Direction": "inbound",
    "CallStatus": "in-progress",
}
"""What every action request carries (the call's standard parameters)."""


def twiml(*verbs: str) -> str:
    return "<?xml version='1.0' encoding='UTF-8'?><Response>" + "".join(verbs) + "</Response>"


def connect(action: str | None, leg: str) -> str:
    """`<Connect><Stream>` to the fake server, with a `leg` parameter to tell streams apart."""
    attribute = f' action="{action}"' if action is not None else ""
    stream = f'<Stream url="wss://voice.example/stream"><Parameter name="leg" value="{leg}"/>'
    return f"<Connect{attribute}>{stream}</Stream></Connect>"


def noise(seconds: float, seed: int = 0) -> bytes:
    """Caller "speech" whose every 20 ms frame is unlike any other, so frames can be traced."""
    samples = np.random.default_rng(seed).normal(0, 3000, int(8000 * seconds))
    return mulaw_encode(np.clip(samples, -32768, 32767).astype("<i2").tobytes())


@dataclass
class Leg:
    """One Media Stream as the fake server saw it. `send` and `hang_up` act on it."""

    signature_problem: str | None
    messages: list[dict[str, Any]] = field(default_factory=list)
    outbox: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)

    @property
    def start(self) -> dict[str, Any]:
        return next(m for m in self.messages if m["event"] == "start")

    @property
    def stream_sid(self) -> str:
        return str(self.start["streamSid"])

    def frames(self) -> list[bytes]:
        return [b64decode(m["media"]["payload"]) for m in self.messages if m["event"] == "media"]

    def send(self, message: str) -> None:
        self.outbox.put_nowait(message)

    def hang_up(self) -> None:
        """The server closes the stream."""
        self.outbox.put_nowait(None)


@dataclass
class Request:
    """A request to the fake server: its path (and query), form, and signature verdict."""

    path: str
    form: dict[str, str]
    signature_problem: str | None


class FakeServer:
    """The Twilio-facing side of a server and no more: a POST to a path answers with the
    TwiML (or the status) `answers` has for it; /stream records what arrives and closes when
    the test says (or at a `stop`). Signatures are checked as a server would; verdicts kept."""

    def __init__(self, answers: dict[str, str | int]) -> None:
        self.answers = answers
        self.requests: list[Request] = []
        self.legs: list[Leg] = []
        self._checker = SignatureChecker(TOKEN, PUBLIC)
        self.app = Quart(__name__)
        self.app.route("/<path:path>", methods=["POST"])(self._answer)
        self.app.websocket("/stream")(self._stream)

    async def _answer(self, path: str) -> tuple[str, int, dict[str, str]]:
        form = dict((await request.form).items())
        problem = self._checker.check_webhook(
            request.path,
            request.query_string.decode(),
            form,
            request.headers.get("X-Twilio-Signature"),
        )
        self.requests.append(Request(request.full_path.rstrip("?"), form, problem))
        answer = self.answers["/" + path]
        if isinstance(answer, int):
            return "no", answer, {}
        return answer, 200, {"Content-Type": "text/xml"}

    async def _stream(self) -> None:
        signature = websocket.headers.get("X-Twilio-Signature")
        leg = Leg(self._checker.check_websocket(websocket.path, "", signature))
        self.legs.append(leg)

        async def read() -> None:
            while True:
                leg.messages.append(json.loads(await websocket.receive()))
                if leg.messages[-1]["event"] == "stop":
                    leg.hang_up()  # as a server does

        reader = asyncio.create_task(read())
        try:
            while (message := await leg.outbox.get()) is not None:
                await websocket.send(message)
        finally:
            reader.cancel()

    async def leg(self, n: int) -> Leg:
        """The `n`th stream (from 0), once its `start` has arrived."""
        await until(
            lambda: len(self.legs) > n and any(m["event"] == "start" for m in self.legs[n].messages)
        )
        return self.legs[n]


async def until(check: Callable[[], object], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


def virtual(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return run_virtual(main())


def now() -> float:
    return asyncio.get_running_loop().time()


@contextlib.asynccontextmanager
async def call(server: FakeServer, **options: Any) -> AsyncIterator[CallerSimulator]:
    async with server.app.test_app():
        async with place_call(
            app=server.app, auth_token=TOKEN, public_url=PUBLIC, call_sid=SID, **options
        ) as sim:
            yield sim


def after_one_stream(answers: dict[str, str | int]) -> tuple[FakeServer, CallerSimulator]:
    """A call whose first stream the server closes at once, followed to its end."""
    server = FakeServer(answers)

    async def main() -> CallerSimulator:
        async with call(server) as sim:
            (await server.leg(0)).hang_up()
            await asyncio.wait_for(sim.closed.wait(), 5)
        return sim

    return server, virtual(main)


@pytest.mark.parametrize(
    "network", [None, Network(0.1, 0.02, seed=3)], ids=["direct", "over-a-network"]
)
def test_digits_a_second_stream_then_a_transfer(network: Network | None) -> None:
    """The server closes the first stream; the simulator requests the action, plays the digits
    the answer asks for, opens a second stream for the same call (the caller's words go on
    over it), and when that one closes too, requests its action and is transferred."""
    server = FakeServer(
        {
            "/voice": twiml(connect(f"{PUBLIC}/after/1", "1")),
            "/after/1": twiml('<Play digits="12w#"/>', connect(f"{PUBLIC}/after/2", "2")),
            "/after/2": twiml("<Dial><Number>+15551234567</Number></Dial>"),
        }
    )
    speech = noise(1.0)

    async def main() -> tuple[CallerSimulator, list[bool], float]:
        over: list[bool] = []  # sim.closed along the way
        async with call(server, network=network) as sim:
            first = await server.leg(0)
            first.send(media_message(first.stream_sid, noise(2.0, seed=1)))  # agent audio
            await asyncio.sleep(0.5)
            await sim.say(speech)
            await asyncio.sleep(0.2)  # mid-sentence
            first.hang_up()
            closed_at = now()
            await until(lambda: sim.log.actions)
            over.append(sim.closed.is_set())
            second = await server.leg(1)
            over.append(sim.closed.is_set())
            await sim.finish_speaking()
            await asyncio.sleep(0.3)
            over.append(sim.closed.is_set())
            second.hang_up()
            await asyncio.wait_for(sim.closed.wait(), 5)
        return sim, over, closed_at

    sim, over, closed_at = virtual(main)
    log = sim.log
    assert over == [False, False, False]
    assert log.ended == "dial" and log.transfers == ["+15551234567"]
    assert log.digits_played == ["12#"] and log.said == []
    assert log.protocol_errors == []

    assert [r.path for r in server.requests] == ["/voice", "/after/1", "/after/2"]
    assert [r.signature_problem for r in server.requests] == [None, None, None]
    assert [r.form for r in server.requests[1:]] == [CALL_FORM, CALL_FORM]
    assert [(a.url, a.status) for a in log.actions] == [
        (f"{PUBLIC}/after/1", 200),
        (f"{PUBLIC}/after/2", 200),
    ]

    first, second = server.legs
    assert [leg.signature_problem for leg in server.legs] == [None, None]
    assert first.start["start"]["callSid"] == second.start["start"]["callSid"] == SID
    assert first.stream_sid != second.stream_sid
    assert sim.stream_sid == second.stream_sid and len(second.stream_sid) == 34
    assert first.start["start"]["customParameters"] == {"leg": "1"}
    assert second.start["start"]["customParameters"] == sim.parameters == {"leg": "2"}
    for leg in server.legs:  # each stream begins afresh, and only speaks of itself
        assert [m["event"] for m in leg.messages[:2]] == ["connected", "start"]
        assert leg.start["sequenceNumber"] == "1"
        media = [m for m in leg.messages if m["event"] == "media"]
        assert media[0]["media"]["chunk"] == "1" and int(media[0]["media"]["timestamp"]) <= 20
        assert {m["streamSid"] for m in leg.messages if "streamSid" in m} == {leg.stream_sid}
    assert [sid for _, sid in log.streams] == [first.stream_sid, second.stream_sid]
    assert log.started == log.streams[0][0]
    gap = log.streams[1][0] - log.actions[0].at
    assert 2.0 - 1e-6 <= gap < 2.05  # four 0.5 s keys and waits, then the stream

    # The caller's words: the start over the first stream, the rest over the second (what
    # was on its way when the stream closed is lost), in order.
    words = [speech[i : i + FRAME_BYTES] for i in range(0, len(speech), FRAME_BYTES)]
    heard_first = [words.index(f) for f in first.frames() if f in words]
    heard_second = [words.index(f) for f in second.frames() if f in words]
    assert heard_first == list(range(len(heard_first))) and len(heard_first) >= 5
    assert heard_second == list(range(heard_second[0], len(words)))
    assert heard_second[0] - len(heard_first) <= 8

    # What the agent had still to say when its stream closed was never heard.
    [played] = log.heard
    assert played.end <= closed_at + 0.2 + 1e-6


def test_verbs_after_a_connect_without_action_then_a_relative_action() -> None:
    """Without an action, the verbs after <Connect> follow its stream; an action relative to
    its document is requested at the URL it resolves to (query kept, and signed)."""
    server = FakeServer(
        {
            "/voice": twiml(
                connect(None, "1"), "<Say>Please hold.</Say>", connect("after/1?try=2", "2")
            ),
            "/after/1": twiml("<Say>Goodbye.</Say>", "<Hangup/>", "<Say>Never said.</Say>"),
        }
    )

    async def main() -> tuple[CallerSimulator, float]:
        async with call(server) as sim:
            (await server.leg(0)).hang_up()
            (await server.leg(1)).hang_up()
            await asyncio.wait_for(sim.closed.wait(), 5)
            ended = now() - sim.log.actions[0].at
        return sim, ended

    sim, ended = virtual(main)
    assert sim.log.said == ["Please hold.", "Goodbye."] and sim.log.ended == "hangup"
    assert [(a.url, a.status) for a in sim.log.actions] == [(f"{PUBLIC}/after/1?try=2", 200)]
    assert server.requests[-1].path == "/after/1?try=2"
    assert server.requests[-1].signature_problem is None
    assert 0.48 - 1e-6 <= ended < 0.5  # "Goodbye." at 0.06 s a character
    assert len(sim.log.streams) == 2


@pytest.mark.parametrize(
    "dial, dialled",
    [
        ("<Dial>+15551234567</Dial>", ["+15551234567"]),
        (
            "<Dial><Sip>sip:desk@pbx.example</Sip></Dial><Say>Not reached.</Say>",
            ["sip:desk@pbx.example"],
        ),
    ],
)
def test_dial_records_the_transfer_and_ends_the_call(dial: str, dialled: list[str]) -> None:
    _, sim = after_one_stream(
        {"/voice": twiml(connect(f"{PUBLIC}/next", "1")), "/next": twiml(dial)}
    )
    assert sim.log.transfers == dialled and sim.log.ended == "dial" and sim.log.said == []


def test_echo_and_interjections_carry_on_over_the_new_stream() -> None:
    """The caller spoke on the first stream; the agent's reply on the second is echoed, and
    interjected into, as on one stream."""
    server = FakeServer(
        {"/voice": twiml(connect(f"{PUBLIC}/next", "1")), "/next": twiml(connect(None, "2"))}
    )
    options: dict[str, Any] = {
        "echo": Echo(-20.0, 0.1),
        "interjections": [Interjection("mm-hm", after_agent_s=0.3)],
    }

    async def main() -> CallerSimulator:
        async with call(server, **options) as sim:
            first = await server.leg(0)
            await sim.say(noise(0.2))
            await sim.finish_speaking()
            first.hang_up()
            second = await server.leg(1)
            await asyncio.sleep(0.1)  # the reply comes once the caller has finished
            second.send(media_message(second.stream_sid, noise(1.0, seed=2)))
            await asyncio.sleep(1.5)
        return sim

    sim = virtual(main)
    [(at, what)] = sim.log.interjections
    assert what == "mm-hm" and at > sim.log.streams[1][0]
    assert sim.log.ended == "caller"
    voiced = sum(frame != SILENCE for frame in server.legs[1].frames())
    assert voiced >= 45  # the echo of 1 s of agent audio (the mm-hm alone is 20 frames)


def test_without_an_action_the_call_ends_with_its_stream() -> None:
    server, sim = after_one_stream({"/voice": twiml(connect(None, "1"))})
    assert sim.log.ended == "hangup" and sim.log.actions == []
    assert [r.path for r in server.requests] == ["/voice"]


def test_when_the_caller_hangs_up_no_action_is_requested() -> None:
    server = FakeServer({"/voice": twiml(connect(f"{PUBLIC}/next", "1"))})

    async def main() -> CallerSimulator:
        async with call(server) as sim:
            await server.leg(0)
            await sim.hang_up()  # the server closes the stream at the stop
            await asyncio.sleep(0.5)
        return sim

    sim = virtual(main)
    assert sim.log.ended == "caller" and sim.log.actions == []
    assert [r.path for r in server.requests] == ["/voice"]
    assert server.legs[0].messages[-1]["event"] == "stop"


def test_an_action_that_fails_ends_the_call_as_an_application_error() -> None:
    _, sim = after_one_stream({"/voice": twiml(connect(f"{PUBLIC}/next", "1")), "/next": 500})
    assert sim.log.ended == "application error"
    assert [(a.url, a.status) for a in sim.log.actions] == [(f"{PUBLIC}/next", 500)]


def test_twiml_the_simulator_cannot_follow_fails_the_test() -> None:
    with pytest.raises(WebhookError, match="cannot follow <Gather>"):
        after_one_stream(
            {"/voice": twiml(connect(f"{PUBLIC}/next", "1")), "/next": twiml("<Gather/>")}
        )


async def test_over_loopback() -> None:
    """The same over real HTTP and WebSockets (uvicorn on a loopback port), in real time."""
    server = FakeServer(
        {
            "/voice": twiml(connect(f"{PUBLIC}/after/1", "1")),
            "/after/1": twiml('<Play digits="5"/>', connect(f"{PUBLIC}/after/2", "2")),
            "/after/2": twiml("<Dial>+15551234567</Dial>"),
        }
    )
    async with serving(server.app) as url:
        async with place_call(url, auth_token=TOKEN, public_url=PUBLIC, call_sid=SID) as sim:
            (await server.leg(0)).hang_up()
            (await server.leg(1)).hang_up()
            await asyncio.wait_for(sim.closed.wait(), 5)
    assert sim.log.ended == "dial" and sim.log.transfers == ["+15551234567"]
    assert sim.log.digits_played == ["5"]
    assert [r.signature_problem for r in server.requests] == [None] * 3
    assert [r.form for r in server.requests[1:]] == [CALL_FORM, CALL_FORM]
    assert server.legs[1].start["start"]["callSid"] == SID
    assert server.legs[0].stream_sid != server.legs[1].stream_sid
