"""The agent's audio through a `Call`, from the model's events to Twilio's media messages: the
caller hears each of the model's replies as the model made it, nothing of one in another."""

from __future__ import annotations

import numpy as np
from google.adk.agents.run_config import RunConfig
from google.adk.events import Event
from google.adk.runners import Runner
from google.adk.sessions import InMemorySessionService
from google.genai import types

from telephony.agents.echo import echo_app
from telephony.audio import InboundConverter, OutboundConverter, PcmResampler
from telephony.call import Call, CallInfo, CallOptions
from telephony.twilio.media_stream import PlayMedia, Start, parse_outbound

from .audio_tools import fixture, pcm

CHUNK = 1920
"""40 ms of 24 kHz PCM16, as Gemini sends it."""


def _speech24(name: str) -> bytes:
    return PcmResampler().convert(InboundConverter().convert(fixture(name)))


def _audio(chunk: bytes) -> Event:
    blob = types.Blob(data=chunk, mime_type="audio/pcm;rate=24000")
    return Event(
        author="agent", content=types.Content(role="model", parts=[types.Part(inline_data=blob)])
    )


async def _say(call: Call, reply: bytes) -> None:
    """One model turn as the supervisor hands it over: audio chunks, then turn_complete."""
    for i in range(0, len(reply), CHUNK):
        await call._on_model_event(_audio(reply[i : i + CHUNK]), True)
    await call._on_model_event(Event(author="agent", turn_complete=True), True)


async def test_a_reply_starts_with_its_own_audio_not_the_end_of_the_one_before() -> None:
    """The outbound filter held back the greeting's end (its last 5 ms and the filter's decay)
    until the next reply pushed it out, as a click at that reply's start. Here the greeting
    stops mid-word and the reply opens with 50 ms of silence: the caller must hear that
    silence, and the greeting to its end."""
    runner = Runner(app=echo_app(), session_service=InMemorySessionService())
    call = Call(
        CallInfo("CA" + "8" * 32, "+1", "+2"),
        runner=runner,
        run_config=RunConfig(),
        options=CallOptions(playback_lead_ms=60_000),  # no pacing: every message goes at once
    )
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    call.attach(Start(1, "MZ1", "AC1", "CA1", ("inbound",), {}), send)
    speech = _speech24("weather")
    greeting = speech[: len(speech) // 2 // 2 * 2]  # stops mid-word: its last 10 ms are loud
    assert np.sqrt(np.mean(np.frombuffer(greeting[-240:], "<i2").astype(float) ** 2)) > 1000
    reply = bytes(2 * 1200) + _speech24("hello")

    def heard(messages: list[str]) -> np.ndarray:
        media = [parse_outbound(text) for text in messages]
        return pcm(b"".join(m.payload for m in media if isinstance(m, PlayMedia)))

    await _say(call, greeting)
    greeting_heard = heard(sent)
    sent.clear()
    await _say(call, reply)
    reply_heard = heard(sent)

    reply_made = pcm(OutboundConverter().convert(reply))
    assert np.array_equal(reply_heard[: len(reply_made)], reply_made)
    assert not reply_heard[:400].any()  # its 50 ms of silence, as the model made it
    greeting_made = pcm(OutboundConverter().convert(greeting + bytes(48000)))
    assert np.array_equal(greeting_heard, greeting_made[: len(greeting_heard)])
    assert not greeting_made[len(greeting_heard) :].any()  # none of it left unheard
