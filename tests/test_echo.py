"""Echo suppression, measured with real speech: the agent's echo never reaches the model (its
VAD is the Gemini stand-in's, as demanding as the service's), the caller talking over the agent
does, unchanged, and comfort noise is the line's own."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from telephony.audio import InboundConverter, mulaw_encode
from telephony.audio.echo import ECHO_RETURN_LOSS, EVIDENCE_FRAMES, ComfortNoise, EchoSuppressor
from telephony.testing.gemini_live import SpeechDetector

from .audio_tools import fixture, line_noise, pcm

FRAME = 160
"""20 ms of the line at 8 kHz: one Twilio message."""
AGENT_AT_S = 3.0
"""The agent starts talking this far into each line (the detectors have settled by then)."""
ECHO_DELAY_FRAMES = 8
"""The echo comes back 160 ms after the caller heard the agent."""
SENT_AHEAD_FRAMES = 20
HEARD_FOR_FRAMES = 25
"""The worst case covers agent audio sent up to 400 ms ahead of the caller's ear (the lead)
and heard up to 500 ms ago, as `Player.loudest_recent` does."""
NOISES = [("none", 0), ("line", 30), ("hum", 20), ("white", 30)]
"""Line noise around -60 dBFS: the echo of the agent stands above it, as on a quiet line."""


def _frames(x: np.ndarray) -> np.ndarray:
    return x[: len(x) // FRAME * FRAME].reshape(-1, FRAME)


@dataclass
class Line:
    """One caller line through the suppressor, 20 ms at a time (16 kHz frames)."""

    sent: np.ndarray
    """What the caller's end sent (the model got this before)."""
    model: np.ndarray
    """What the model gets now."""

    def changed(self) -> np.ndarray:
        return np.any(self.sent != self.model, axis=1)


def _line(
    *,
    seconds: float,
    noise: tuple[str, int] = ("none", 0),
    agent: tuple[str, ...] = ("hello",),
    echo_db: float | None = -25.0,
    echo_from_s: float = 0.0,
    caller: str | None = None,
    caller_at_s: float = 0.0,
    chunk_frames: int = 1,
) -> Line:
    n = int(seconds * 8000)
    kind, rms = noise
    uplink = pcm(line_noise(seconds, kind, rms)) if rms else np.zeros(n)
    heard = np.zeros(n)
    voice = np.concatenate([pcm(fixture(name)) for name in agent])
    at = int(AGENT_AT_S * 8000)
    heard[at : at + len(voice)] = voice[: n - at]
    if echo_db is not None:
        delay = ECHO_DELAY_FRAMES * FRAME
        echo = heard[: n - delay] * 10 ** (echo_db / 20)
        echo[: int(echo_from_s * 8000)] = 0.0
        uplink[delay:] += echo
    if caller is not None:
        speech = pcm(fixture(caller))
        at = int(caller_at_s * 8000)
        uplink[at : at + len(speech)] += speech[: n - at]
    mulaw = mulaw_encode(np.clip(np.rint(uplink), -32768, 32767).astype("<i2").tobytes())
    loudest = np.mean(_frames(heard) ** 2, axis=1)
    converter, suppressor = InboundConverter(), EchoSuppressor()
    sent, model = [], []
    step = chunk_frames * FRAME
    for i in range(0, len(mulaw), step):
        k = i // FRAME
        window = loudest[max(0, k - HEARD_FOR_FRAMES) : k + SENT_AHEAD_FRAMES]
        chunk = converter.convert(mulaw[i : i + step])
        sent.append(chunk)
        model.append(suppressor.process(chunk, float(window.max()) * ECHO_RETURN_LOSS))
    return Line(_pcm_frames(sent), _pcm_frames(model))


def _pcm_frames(chunks: list[bytes]) -> np.ndarray:
    """16 kHz PCM16 as 20 ms frames."""
    return np.frombuffer(b"".join(chunks), "<i2").reshape(-1, 2 * FRAME)


def _turns(frames: np.ndarray, after_s: float) -> list[float]:
    """When the stand-in's VAD starts a turn (after `after_s`: before the agent talks, it is
    still learning the noise, whatever the suppressor does)."""
    detector, starts = SpeechDetector(), []
    for k, frame in enumerate(frames):
        if any(e.kind == "start" for e in detector.feed(frame.tobytes())) and k * 0.02 > after_s:
            starts.append(k * 0.02)
    return starts


def _speech_frames(name: str, at_s: float) -> tuple[int, int]:
    """First and last 20 ms frame of a fixture's speech (above -50 dBFS) on the line."""
    voiced = np.nonzero(np.sqrt(np.mean(_frames(pcm(fixture(name))) ** 2, axis=1)) > 100)[0]
    first = int(at_s / 0.02)
    return first + int(voiced[0]), first + int(voiced[-1])


def test_nothing_changes_while_the_agent_is_silent() -> None:
    suppressor, converter = EchoSuppressor(), InboundConverter()
    mulaw = fixture("hello") + line_noise(1, "line", 300) + fixture("bonjour")
    for i in range(0, len(mulaw), FRAME):
        chunk = converter.convert(mulaw[i : i + FRAME])
        assert suppressor.process(chunk, 0.0) is chunk


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("agent", ["hello", "weather", "bonjour"])
def test_the_agents_echo_never_reaches_the_model(noise: tuple[str, int], agent: str) -> None:
    """At -25 dB, 160 ms late: the stand-in's VAD starts a turn on the echo as it came, on
    none of what the model gets now, which stays at the line's noise level."""
    line = _line(seconds=9, noise=noise, agent=(agent,))
    assert _turns(line.sent, AGENT_AT_S)
    assert _turns(line.model, AGENT_AT_S) == []
    quiet = np.mean(line.sent[: int(AGENT_AT_S / 0.02)].astype(float) ** 2) + 1
    got = np.mean(line.model[int(AGENT_AT_S / 0.02) :].astype(float) ** 2, axis=1) + 1
    loudest_100ms = np.convolve(got, np.ones(5) / 5, "valid").max()
    assert 10 * np.log10(loudest_100ms / quiet) < 3.0


@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("caller", ["stop", "hello", "weather", "bonjour"])
def test_a_caller_talking_over_the_agent_and_its_echo_reaches_the_model_unchanged(
    noise: tuple[str, int], caller: str
) -> None:
    """As loud as the agent: from their first frame louder than any echo could be, every
    frame of their speech is the model's unchanged (only a soft onset under the echo's worst
    case, 60 ms at most, is not)."""
    at_s = AGENT_AT_S + 0.5
    line = _line(seconds=10, noise=noise, caller=caller, caller_at_s=at_s)
    first, last = _speech_frames(caller, at_s)
    changed = np.nonzero(line.changed()[first : last + 1])[0]
    assert changed.tolist() == list(range(len(changed)))  # only at the very start
    assert len(changed) <= 3


@pytest.mark.parametrize("caller", ["stop", "hello", "weather", "bonjour"])
def test_on_a_line_without_echo_the_caller_reaches_the_model_whole(caller: str) -> None:
    """Once the agent has talked for a few seconds into a line that returns nothing, even the
    softest onset over it is no longer taken for echo: nothing of the caller is changed."""
    at_s = AGENT_AT_S + 4.0
    line = _line(seconds=13, echo_db=None, caller=caller, caller_at_s=at_s)
    first, last = _speech_frames(caller, at_s)
    assert not line.changed()[first : last + 1].any()


def test_an_echo_that_starts_late_reaches_the_model_for_little_more_than_100_ms() -> None:
    """The caller switches to the speakerphone after the agent talked 4 s into a line without
    echo: the first of its echo passes (for `EVIDENCE_FRAMES`, and the frame it took to rise),
    then none, and the stand-in's VAD starts no turn on it."""
    echo_from_s = AGENT_AT_S + 4.0
    line = _line(seconds=12, agent=("hello", "weather"), echo_from_s=echo_from_s)
    after = int(echo_from_s / 0.02)
    echo = np.nonzero(np.any(line.sent[after:] != 0, axis=1))[0]
    reached = np.all(line.sent[after:][echo] == line.model[after:][echo], axis=1)
    assert 0 < reached.sum() <= EVIDENCE_FRAMES + 1
    assert _turns(line.model, echo_from_s) == []


def test_comfort_noise_never_outlasts_the_lines_own() -> None:
    """The line's noise stops (a mobile's noise suppression) while the agent talks into it:
    within 100 ms, what replaces the echo is silence too, never noise louder than the line."""
    line = _line(seconds=6, noise=("line", 300), echo_db=None)
    suppressor = EchoSuppressor()
    for frame in line.sent[: int(AGENT_AT_S / 0.02)]:
        suppressor.process(frame.tobytes(), 0.0)
    silence = np.zeros(2 * FRAME, "<i2").tobytes()
    got = [suppressor.process(silence, 10.0**7) for _ in range(50)]
    assert all(frame == silence for frame in got[5:])


@pytest.mark.parametrize("kind", ["white", "hum", "line", "rumble"])
@pytest.mark.parametrize("rms", [100, 1000])
def test_comfort_noise_is_the_lines_own(kind: str, rms: int) -> None:
    """Learnt from 2 s of the line: as loud (within 1 dB; a rumble, whose level its bursts
    make, within 5 dB and never louder), and with its spectrum (bands within 4 dB once levels
    are matched: a hum's lines spread over 100 Hz in comfort noise)."""
    line = np.frombuffer(InboundConverter().convert(line_noise(4, kind, rms)), "<i2")
    noise = ComfortNoise()
    half = len(line) // 2 // 320 * 320
    for i in range(0, half, 320):
        frame = line[i : i + 320].astype(np.float64)
        noise.observe(frame, float(np.dot(frame, frame)) / 320)
    real = line[half:].astype(np.float64)
    comfort = np.concatenate([noise.generate(320) for _ in range(len(real) // 320)])
    level_db = 10 * np.log10(np.mean(comfort**2) / np.mean(real**2))
    if kind == "rumble":
        assert -5.0 < level_db < 0.0
    else:
        assert abs(level_db) < 1.0
    edges = [0, 300, 1000, 2000, 3400, 8000]
    shares = []
    for x in (real, comfort):
        freqs, power = np.fft.rfftfreq(len(x), 1 / 16000), np.abs(np.fft.rfft(x)) ** 2
        bands = np.array(
            [power[(freqs >= f) & (freqs < edges[i + 1])].sum() for i, f in enumerate(edges[:-1])]
        )
        shares.append(10 * np.log10(bands / bands.sum()))
    assert np.abs(shares[0] - shares[1]).max() < 4.0


def test_comfort_noise_fades_in_and_is_the_same_every_call() -> None:
    """Replays of a recorded call send the model the same audio; and noise that starts where
    the caller's audio stopped does not click."""
    a, b = ComfortNoise(), ComfortNoise()
    frame = np.random.default_rng(1).normal(0, 300, 320)
    for noise in (a, b):
        for _ in range(10):
            noise.observe(frame, float(np.dot(frame, frame)) / 320)
    first = a.generate(320)
    assert np.array_equal(first, b.generate(320))
    assert np.abs(first[:16]).max() < np.abs(first[160:]).max() / 2


@pytest.mark.parametrize("counts", [[320] * 25, [3200, 6400, 320, 640]])
def test_comfort_noise_is_one_filtered_stream_whatever_is_asked(counts: list[int]) -> None:
    """Asked for frame by frame or more than a block at once, across the blocks synthesized
    ahead and a restart's fade, the samples are one stream: white noise (the seed's) through
    the line's noise filter, scaled to its level, faded in at the start and after a restart."""
    noise = ComfortNoise(seed=3)
    frame = np.random.default_rng(2).normal(0, 300, 320)
    for _ in range(10):
        noise.observe(frame, float(np.dot(frame, frame)) / 320)
    pieces = []
    for n, count in enumerate(counts):
        if n == 2:
            noise.restart()
        pieces.append(noise.generate(count))
    got = np.concatenate(pieces)
    white = np.random.default_rng(3).standard_normal(2 * sum(counts) + 10 * 3200)
    shape = noise._shape
    assert shape is not None
    expected = np.convolve(white, shape)[: len(got)] * np.sqrt(noise.level)
    for faded in (0, sum(counts[:2])):
        expected[faded : faded + 64] *= np.linspace(0.0, 1.0, 64, endpoint=False)
    assert np.abs(got - np.rint(expected)).max() <= 1.0


def test_frames_are_judged_alike_whatever_the_chunks() -> None:
    """A chunk of several frames is judged frame by frame."""
    line = _line(seconds=8, noise=("line", 30), caller="stop", caller_at_s=AGENT_AT_S + 1.0)
    audio, worst = line.sent.tobytes(), 3000.0**2 * ECHO_RETURN_LOSS
    outputs = []
    for size in (640, 1280):  # 20 and 40 ms
        suppressor = EchoSuppressor()
        chunks = [audio[i : i + size] for i in range(0, len(audio), size)]
        outputs.append(b"".join(suppressor.process(chunk, worst) for chunk in chunks))
    assert outputs[0] == outputs[1] != audio
