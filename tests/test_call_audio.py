"""Audio through a `Call`. The agent's, from the model's events to Twilio's media messages: the
caller hears each of the model's replies as the model made it, nothing of one in another. The
caller's, from Twilio's frames to the model: in batches, except where the model's turn-taking
needs it at once."""

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
from telephony.call.call import URGENT_AFTER_ONSET_S, URGENT_BYTES
from telephony.call.supervisor import CALLER_BATCH_BYTES
from telephony.twilio.media_stream import PlayMedia, Start, parse_outbound

from .audio_tools import fixture, line_noise, pcm

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


async def test_caller_audio_goes_in_batches_but_onsets_and_ends_at_once() -> None:
    """200 ms batches while nothing is decided; the onset our VAD hears, with what was held
    before it, goes at once; in the next 300 ms, and from late in a pause that may end the
    turn, 40 ms pieces. Nothing is lost or reordered on the way."""
    now = [0.0]
    call = Call(
        CallInfo("CA" + "9" * 32, "+1", "+2"),
        runner=Runner(app=echo_app(), session_service=InMemorySessionService()),
        run_config=RunConfig(),
        options=CallOptions(),
        clock=lambda: now[0],
    )

    async def send(text: str) -> None:
        pass

    call.attach(Start(1, "MZ1", "AC1", "CA1", ("inbound",), {}), send)
    quiet, speech = line_noise(1.0, "line", 30), fixture("hello")
    caller = quiet + speech + line_noise(2.0, "line", 30, seed=8)
    sent: list[tuple[float, int]] = []  # (time sent, bytes)
    audio = bytearray()
    queue = call.live.queue
    onset = end = None
    for i in range(0, len(caller), 160):
        await call._on_media(caller[i : i + 160])
        while not queue._queue.empty():
            blob = queue._queue.get_nowait().blob
            assert blob is not None and blob.data
            sent.append((now[0], len(blob.data)))
            audio += blob.data
        if onset is None and call._vad.speaking:
            onset = now[0]
        if onset is not None and end is None and not call._vad.speaking:
            end = now[0]
        now[0] += 0.02
    call.live.end_caller_audio()  # what is held goes, then the stream's end
    rest = [queue._queue.get_nowait() for _ in range(queue._queue.qsize())]
    assert rest[-1].audio_stream_end
    assert onset is not None and end is not None
    audio += b"".join(r.blob.data or b"" for r in rest if r.blob)
    inbound = InboundConverter()  # no agent audio: nothing for the echo suppressor to replace
    said = b"".join(inbound.convert(caller[i : i + 160]) for i in range(0, len(caller), 160))
    assert bytes(audio) == said
    before = [size for t, size in sent if t < onset]
    assert before and set(before) == {CALLER_BATCH_BYTES}
    assert sent[len(before)][0] == onset  # the onset goes with the frame that made it
    after_onset = [size for t, size in sent if onset < t < onset + URGENT_AFTER_ONSET_S - 0.02]
    assert after_onset and set(after_onset) == {URGENT_BYTES}
    late = [t for t, size in sent if size == CALLER_BATCH_BYTES and t > onset]
    assert late and min(late) > onset + URGENT_AFTER_ONSET_S  # batches again mid-utterance
    around_end = [size for t, size in sent if end - 0.15 < t < end + 0.25]
    assert around_end and set(around_end) == {URGENT_BYTES}
    quiet_again = [size for t, size in sent if t > end + 0.5]
    assert len(quiet_again) >= 3 and set(quiet_again) == {CALLER_BATCH_BYTES}
