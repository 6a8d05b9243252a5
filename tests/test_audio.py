"""The converters' figures, measured: G.711 exactness, passband, images/aliases, chunking,
delay, and no bursts."""

from __future__ import annotations

import random

import numpy as np
import pytest

import telephony.audio.convert
from telephony.audio import (
    InboundConverter,
    OutboundConverter,
    PcmResampler,
    mulaw_decode,
    mulaw_encode,
)

from .audio_tools import fixture, pcm, tone_amplitude

audioop = pytest.importorskip("audioop")

PASSBAND = np.arange(300, 3401, 50)


@pytest.fixture(autouse=True, params=["native", "numpy"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every figure holds for the C kernel and for the numpy fallback alike."""
    if request.param == "native":
        if not telephony.audio.convert.NATIVE:
            pytest.skip("the C kernel is not built here")
    else:
        monkeypatch.setattr(telephony.audio.convert, "NATIVE", False)
    return request.param


def test_mulaw_decode_matches_audioop_for_every_byte() -> None:
    every = bytes(range(256))
    assert mulaw_decode(every) == audioop.ulaw2lin(every, 2)


def test_mulaw_encode_matches_audioop_for_every_sample() -> None:
    every = np.arange(65536, dtype=np.uint16).tobytes()
    assert mulaw_encode(every) == audioop.lin2ulaw(every, 2)


def _steady(y: np.ndarray, rate: int) -> np.ndarray:
    return y[rate // 10 : -rate // 10]


@pytest.mark.parametrize("freq", PASSBAND)
def test_inbound_passband_is_flat(freq: float) -> None:
    x = 10000 * np.sin(2 * np.pi * freq * np.arange(8000) / 8000)
    y = _steady(InboundConverter().resampler.process(x), 16000)
    gain_db = 20 * np.log10(tone_amplitude(y, freq, 16000) / 10000)
    assert abs(gain_db) <= 0.1


@pytest.mark.parametrize("freq", PASSBAND)
def test_inbound_images_are_80_db_down(freq: float) -> None:
    x = 10000 * np.sin(2 * np.pi * freq * np.arange(8000) / 8000)
    y = _steady(InboundConverter().resampler.process(x), 16000)
    image_db = 20 * np.log10(tone_amplitude(y, 8000 - freq, 16000) / 10000)
    assert image_db <= -80


@pytest.mark.parametrize("freq", PASSBAND)
def test_outbound_passband_is_flat(freq: float) -> None:
    x = 10000 * np.sin(2 * np.pi * freq * np.arange(24000) / 24000)
    y = _steady(OutboundConverter().resampler.process(x), 8000)
    gain_db = 20 * np.log10(tone_amplitude(y, freq, 8000) / 10000)
    assert abs(gain_db) <= 0.1


@pytest.mark.parametrize("freq", np.arange(4000, 12000, 100))
def test_outbound_aliases_are_80_db_down(freq: float) -> None:
    """Everything at or above 4 kHz would alias; what comes out of it must be 80 dB down."""
    x = 10000 * np.sin(2 * np.pi * freq * np.arange(24000) / 24000)
    y = _steady(OutboundConverter().resampler.process(x), 8000)
    alias_db = 20 * np.log10(np.sqrt(2 * np.mean(y**2)) / 10000)
    assert alias_db <= -80


def _chunked(convert, data: bytes, sizes: list[int]) -> list[bytes]:
    out, i = [], 0
    for size in sizes:
        out.append(convert(data[i : i + size]))
        i += size
    out.append(convert(data[i:]))
    return out


def _random_sizes(total: int, seed: int) -> list[int]:
    """Chunk sizes from 0 to 997 bytes, odd ones included."""
    rng = random.Random(seed)
    sizes, used = [], 0
    while used < total:
        size = rng.randint(0, 997)
        sizes.append(size)
        used += size
    return sizes


@pytest.mark.parametrize("seed", range(4))
def test_inbound_chunked_equals_whole(seed: int) -> None:
    speech = fixture("hello")
    whole = np.frombuffer(InboundConverter().convert(speech), np.int16)
    conv = InboundConverter()
    parts = _chunked(conv.convert, speech, _random_sizes(len(speech), seed))
    chunked = np.frombuffer(b"".join(parts), np.int16)
    assert len(chunked) == len(whole) == 2 * len(speech)
    assert np.max(np.abs(chunked.astype(int) - whole)) <= 1


@pytest.mark.parametrize("seed", range(4))
def test_outbound_chunked_equals_whole_with_odd_byte_counts(seed: int) -> None:
    speech24 = PcmResampler().convert(InboundConverter().convert(fixture("weather")))
    whole = pcm(OutboundConverter().convert(speech24))
    conv = OutboundConverter()
    parts = _chunked(conv.convert, speech24, _random_sizes(len(speech24), seed))
    assert any(len(p) for p in parts)
    chunked = pcm(b"".join(parts))
    assert len(chunked) == len(whole) == len(speech24) // 6
    # mu-law codes: 1 LSB of the linear signal may flip a code; compare the codes' neighbours
    whole_codes = np.frombuffer(OutboundConverter().convert(speech24), np.uint8).astype(int)
    chunked_codes = np.frombuffer(b"".join(parts), np.uint8).astype(int)
    assert np.max(np.abs(whole_codes - chunked_codes)) <= 1


def test_inbound_added_delay_is_under_5_ms() -> None:
    impulse = mulaw_encode(np.array([30000], "<i2").tobytes())
    silence = b"\xff" * 400
    y = np.abs(np.frombuffer(InboundConverter().convert(impulse + silence), np.int16))
    delay_ms = 1000 * int(np.argmax(y)) / 16000
    assert delay_ms <= 5


def test_outbound_added_delay_is_under_5_ms() -> None:
    x = np.zeros(2400, "<i2")
    x[0] = 30000
    y = np.abs(pcm(OutboundConverter().convert(x.tobytes())))
    delay_ms = 1000 * int(np.argmax(y)) / 8000
    assert delay_ms <= 5


def test_every_chunk_yields_its_share_at_once() -> None:
    """No bursts: after each chunk, all output its input determines has been returned."""
    inbound = InboundConverter()
    fed = out = 0
    for size in (1, 7, 160, 33, 0, 480, 5):
        out += len(inbound.convert(b"\x7f" * size))
        fed += size
        assert out == 4 * fed
    outbound = OutboundConverter()
    fed = out = 0
    for size in (1, 3, 5, 960, 4801, 2, 6, 11):
        out += len(outbound.convert(b"\x10" * size))
        fed += size
        assert out == fed // 2 // 3


def test_a_flush_ends_the_audio_whole_and_the_next_starts_afresh() -> None:
    """What the filter holds back comes out at a flush, as the silence after it would push it
    out, and what follows is converted as by a new converter (an odd byte is not carried)."""
    speech24 = PcmResampler().convert(InboundConverter().convert(fixture("weather")))
    first, second = speech24[:12_345], speech24[12_345:]
    conv = OutboundConverter()
    assert conv.flush() == b""  # nothing fed: no silence to send
    heard = conv.convert(first) + conv.flush()
    made = OutboundConverter().convert(first + bytes(48000))
    assert heard == made[: len(heard)]
    assert not pcm(made[len(heard) :]).any()
    assert len(heard) - len(first) // 6 < 80  # its delay and decay: under 10 ms
    assert conv.convert(second) == OutboundConverter().convert(second)


def test_echo_resampler_keeps_speech() -> None:
    """16 kHz -> 24 kHz for the simulated model: same sound, 1.5x the samples."""
    pcm16 = InboundConverter().convert(fixture("stop"))
    pcm24 = np.frombuffer(PcmResampler().convert(pcm16), np.int16)
    assert len(pcm24) == len(pcm16) // 2 * 3 // 2
    x = np.frombuffer(pcm16, np.int16).astype(float)
    y = pcm24.astype(float)
    for freq in (500, 1500, 3000):
        tone = 8000 * np.sin(2 * np.pi * freq * np.arange(16000) / 16000)
        out = np.frombuffer(PcmResampler().convert(tone.astype("<i2").tobytes()), np.int16)
        assert (
            abs(20 * np.log10(tone_amplitude(out[2400:-2400].astype(float), freq, 24000) / 8000))
            < 0.1
        )
    assert np.sqrt(np.mean(y**2)) == pytest.approx(np.sqrt(np.mean(x**2)), rel=0.05)


def test_resampler_rejects_unsupported_ratio() -> None:
    with pytest.raises(ValueError, match="3/2"):
        PcmResampler(2, 1)
