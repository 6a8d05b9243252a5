"""Barge-in detection, measured: delay from speech onset, and false triggers on line noise."""

from __future__ import annotations

import numpy as np
import pytest

from telephony.audio import InboundConverter, mulaw_encode
from telephony.audio.vad import SpeechEnd, SpeechStart, VoiceActivityDetector

from .audio_tools import fixture, line_noise, pcm

SPEECH = ["hello", "weather", "stop", "bonjour"]


def _run(mulaw: bytes) -> list[SpeechStart | SpeechEnd]:
    conv, vad, events = InboundConverter(), VoiceActivityDetector(), []
    for i in range(0, len(mulaw), 160):
        events += vad.feed(conv.convert(mulaw[i : i + 160]))
    return events


def _onset_ms(speech: bytes) -> float:
    """Where the speech really starts: first 10 ms block above -40 dBFS."""
    x = pcm(speech)
    blocks = np.sqrt(np.mean(x[: len(x) // 80 * 80].reshape(-1, 80) ** 2, axis=1))
    return 10.0 * int(np.argmax(blocks > 330))


def _mix(noise: bytes, speech: bytes, at_s: float) -> bytes:
    x = pcm(noise)
    at = int(at_s * 8000)
    x[at : at + len(speech)] += pcm(speech)
    return mulaw_encode(np.clip(x, -32768, 32767).astype("<i2").tobytes())


@pytest.mark.parametrize("name", SPEECH)
@pytest.mark.parametrize("noise", ["none", "line"])
def test_detects_speech_within_150_ms_of_onset(name: str, noise: str) -> None:
    speech = fixture(name)
    background = b"\xff" * 8000 * 6 if noise == "none" else line_noise(6, "line", rms=300)
    events = _run(_mix(background, speech, at_s=1.0))
    starts = [e for e in events if isinstance(e, SpeechStart)]
    assert len(starts) >= 1
    onset = 1000 + _onset_ms(speech)
    # `offset_ms` is the first speech frame; detection happens start_frames later.
    detected_at = starts[0].offset_ms + 4 * 20
    assert onset - 40 <= starts[0].offset_ms
    assert detected_at - onset <= 150
    assert any(isinstance(e, SpeechEnd) and e.offset_ms > starts[0].offset_ms for e in events)


@pytest.mark.parametrize("kind", ["white", "rumble", "hum", "line"])
@pytest.mark.parametrize("rms", [100, 1000, 3000])
def test_no_false_triggers_on_30_s_of_noise(kind: str, rms: int) -> None:
    assert _run(line_noise(30, kind, rms)) == []


@pytest.mark.parametrize("kind", ["white", "hum", "line"])
@pytest.mark.parametrize("rms", [300, 1000, 3000])
def test_noise_starting_after_silence_is_speech_for_a_moment_at_most(kind: str, rms: int) -> None:
    """A caller who walks into a noisy street: the onset may trigger once, the noise must not
    count as speech beyond a second, and never trigger again."""
    events = _run(b"\xff" * 16000 + line_noise(20, kind, rms))
    starts = [e for e in events if isinstance(e, SpeechStart)]
    ends = [e for e in events if isinstance(e, SpeechEnd)]
    assert len(starts) <= 1
    if starts:
        assert len(ends) == 1 and ends[0].offset_ms - 2000 <= 1000


def test_end_of_stream_closes_an_utterance() -> None:
    conv, vad = InboundConverter(), VoiceActivityDetector()
    speech = fixture("stop")
    events = vad.feed(conv.convert(b"\xff" * 2400 + speech[:8000]))
    assert any(isinstance(e, SpeechStart) for e in events) and vad.speaking
    assert isinstance(vad.end_of_stream(), SpeechEnd)
    assert vad.end_of_stream() is None


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="aggressiveness"):
        VoiceActivityDetector(aggressiveness=4)
    with pytest.raises(ValueError, match="start_frames"):
        VoiceActivityDetector(start_frames=9, window=6)


def test_accepts_any_chunk_size() -> None:
    conv = InboundConverter()
    audio = conv.convert(b"\xff" * 2400 + fixture("hello"))
    whole = VoiceActivityDetector().feed(audio)
    vad, pieces = VoiceActivityDetector(), []
    for i in range(0, len(audio), 333):
        pieces += vad.feed(audio[i : i + 333])
    assert pieces == whole and whole


def test_speech_and_trailing_silence_are_measured_while_speaking() -> None:
    vad = VoiceActivityDetector()
    speech = InboundConverter().convert(b"\xff" * 1600 + fixture("time") + b"\xff" * 4000)
    longest = 0
    for i in range(0, len(speech), 640):
        vad.feed(speech[i : i + 640])
        if vad.speaking:
            longest = max(longest, vad.speech_ms)
            assert vad.silence_ms <= 600
    assert 850 <= longest <= 1000  # "What time is it?": about 0.9 s of speech


def test_frames_below_a_given_energy_are_not_speech() -> None:
    """The call passes what the agent's echo could reach: that much is never the caller."""
    speech = InboundConverter().convert(b"\xff" * 1600 + fixture("time") + b"\xff" * 16000)
    assert VoiceActivityDetector().feed(speech, min_energy=0.0) != []
    samples = np.frombuffer(speech, np.int16).astype(np.float64)
    frames = samples[: len(samples) // 320 * 320].reshape(-1, 320)
    loudest = float(np.max(np.mean(frames**2, axis=1)))
    assert VoiceActivityDetector().feed(speech, min_energy=loudest * 1.01) == []
