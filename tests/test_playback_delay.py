"""Agent audio over slow lines: two-minute conversations with the echo agent, in-process on a
virtual clock, through the simulator's model of Twilio (audio plays when it arrives, marks echo
once played and travel back delayed, a clear acts when it arrives). Mark echoes come back a
round trip late; a player that does not allow for it lets Twilio's buffer run dry inside every
reply on a 300 ms line (225 silences in two minutes before the player learnt the round trip).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from quart import Quart

from telephony.agents import AgentSpec, phone_run_config
from telephony.agents.echo import echo_app
from telephony.call.playback import MAX_LEAD_S
from telephony.server.app import create_app
from telephony.settings import Settings
from telephony.testing.simulator import CallerSimulator, CallLog, Network, place_call
from telephony.testing.virtual_clock import run_virtual

from .audio_tools import fixture

CALL_SID = "CA" + "7" * 32
LINES = {
    "0 ms": None,
    "150±25 ms": Network(delay_s=0.125, jitter_s=0.05, seed=1),
    "300±50 ms": Network(delay_s=0.25, jitter_s=0.1, seed=2),
}
"""One-way delays: the simulator's jitter only adds, so d±j is a delay of d-j plus up to 2j."""
LONG = fixture("hello") + fixture("weather") + fixture("bonjour")
"""10.8 s of speech whose pauses (under 400 ms) the echo agent hears as one utterance: it
answers with one long reply."""
UTTERANCES = [LONG, fixture("sunday"), fixture("stop"), fixture("time")]
LEAD_S = Settings().playback_lead_ms / 1000


@dataclass
class Conversation:
    log: CallLog
    turns: list[tuple[float, float]] = field(default_factory=list)
    """When the caller started and stopped saying each utterance."""
    lead_s: float = 0.0
    """The lead the player kept at the end of the call."""

    def replies(self) -> list[list[tuple[float, float]]]:
        """The agent audio the caller heard (start, end) in each reply: the greeting, then the
        answer to each utterance (what played between its end and the next one's start)."""
        edges = [self.log.started] + [end for _, end in self.turns]
        nexts = [start for start, _ in self.turns] + [float("inf")]
        return [
            sorted((h.start, h.end) for h in self.log.heard if h.audio and lo <= h.start < hi)
            for lo, hi in zip(edges, nexts, strict=True)
        ]

    def underruns(self) -> list[float]:
        """Each silence the caller heard inside one reply (its length in seconds)."""
        return [
            round(b_start - a_end, 3)
            for reply in self.replies()
            for (_, a_end), (b_start, _) in zip(reply, reply[1:], strict=False)
            if b_start - a_end > 0.001
        ]


Script = Callable[[CallerSimulator, Conversation], Awaitable[None]]


def _on_the_phone(network: Network | None, script: Script) -> Conversation:
    """Runs `script` as the caller of one call to the echo agent, on a virtual clock."""
    settings = Settings(agent="echo", session_db="")
    app: Quart = create_app(settings, AgentSpec(echo_app(), phone_run_config(settings), None))

    async def call() -> Conversation:
        async with app.test_app(), place_call(app=app, call_sid=CALL_SID, network=network) as sim:
            talk = Conversation(sim.log)
            await _answered(sim, sim.log.started)
            await script(sim, talk)
            talk.lead_s = app.extensions["telephony.calls"].get(CALL_SID).player.lead_ms / 1000
            await sim.hang_up()
        return talk

    return run_virtual(call())


async def _say(sim: CallerSimulator, talk: Conversation, speech: bytes) -> float:
    """Says `speech`; returns when its last frame was sent."""
    start = await sim.say(speech)
    await sim.finish_speaking()
    talk.turns.append((start, start + len(speech) / 8000))
    return talk.turns[-1][1]


async def _answered(sim: CallerSimulator, end: float) -> None:
    """Waits for the answer to what the caller said up to `end`, and for it to finish."""
    assert await sim.agent_audio_after(end, timeout=5.0) is not None, "no answer"
    await sim.agent_quiet(1.0)


def converse(network: Network | None, minutes: float = 2.0) -> Conversation:
    """The caller says one utterance after another, each once the answer to the last has
    finished, for `minutes` of virtual time."""

    async def script(sim: CallerSimulator, talk: Conversation) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() - sim.log.started < minutes * 60:
            end = await _say(sim, talk, UTTERANCES[len(talk.turns) % len(UTTERANCES)])
            await _answered(sim, end)

    return _on_the_phone(network, script)


@pytest.mark.parametrize("line", list(LINES))
def test_no_silence_inside_replies_in_a_two_minute_conversation(line: str) -> None:
    network = LINES[line]
    talk = converse(network)
    assert talk.underruns() == []
    replies = talk.replies()
    assert len(talk.turns) >= 12 and all(replies), [len(r) for r in replies]
    assert max(r[-1][1] - r[0][0] for r in replies) > 10  # the long answers were heard whole
    assert not talk.log.clears
    # The lead settles on the configured one plus the round trip (jitter only adds to it).
    low, high = (0, 0) if network is None else (network.delay_s, network.delay_s + network.jitter_s)
    assert LEAD_S + 2 * low - 0.001 <= talk.lead_s <= LEAD_S + 2 * high <= MAX_LEAD_S


def test_a_barge_in_over_a_slow_line_clears_promptly_and_nothing_stale_plays() -> None:
    network = LINES["300±50 ms"]
    assert network is not None

    async def script(sim: CallerSimulator, talk: Conversation) -> None:
        reply = await sim.agent_audio_after(await _say(sim, talk, LONG), timeout=5.0)
        assert reply is not None
        await asyncio.sleep(reply.start + 3.0 - asyncio.get_running_loop().time())
        await _answered(sim, await _say(sim, talk, fixture("stop")))

    talk = _on_the_phone(network, script)
    onset, barge_end = talk.turns[-1]
    [clear_at] = talk.log.clears
    # Our VAD needs about 100 ms of speech, then the news crosses the line both ways.
    assert clear_at - onset <= 0.3 + 2 * (network.delay_s + network.jitter_s)
    heard = [(h.start, h.end) for h in talk.log.heard if h.audio]
    # Nothing of the interrupted answer after the clear: the next audio answers "stop".
    assert [start for start, end in heard if end > clear_at and start < barge_end] == []
    assert [start for start, _ in heard if start > barge_end]
