"""Measurement helpers shared by the tests (and the benchmarks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from telephony.audio import mulaw_decode, mulaw_encode

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> bytes:
    """8 kHz mu-law speech made with espeak-ng (see fixtures/README.md)."""
    return (FIXTURES / f"{name}.ulaw").read_bytes()


def pcm(mulaw: bytes) -> np.ndarray:
    return np.frombuffer(mulaw_decode(mulaw), np.int16).astype(np.float64)


def speech_core(name: str) -> np.ndarray:
    """The fixture without its edges (the VADs on the way may trim a little of each end)."""
    return pcm(fixture(name))[2400:-4000]


def speech_span_s(name: str) -> tuple[float, float]:
    """Where the fixture's speech starts and ends (10 ms blocks above -50 dBFS)."""
    x = pcm(fixture(name))
    blocks = np.sqrt(np.mean(x[: len(x) // 80 * 80].reshape(-1, 80) ** 2, axis=1))
    voiced = np.nonzero(blocks > 100)[0]
    return int(voiced[0]) / 100, (int(voiced[-1]) + 1) / 100


def tone_amplitude(signal: np.ndarray, freq: float, rate: float) -> float:
    """Least-squares amplitude of one sinusoid in `signal` (exact for a steady tone)."""
    t = np.arange(len(signal)) / rate
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    coeffs, *_ = np.linalg.lstsq(basis, signal, rcond=None)
    return float(np.hypot(*coeffs))


def best_correlation(heard: np.ndarray, reference: np.ndarray) -> tuple[float, int]:
    """Highest normalised correlation of `reference` against any offset in `heard`."""
    h = heard.astype(np.float64)
    r = reference.astype(np.float64)
    if len(h) < len(r):
        return 0.0, 0
    size = 1 << (len(h) + len(r)).bit_length()
    corr = np.fft.irfft(np.fft.rfft(h, size) * np.conj(np.fft.rfft(r, size)), size)
    corr = corr[: len(h) - len(r) + 1]
    energy = np.sqrt(np.maximum(np.convolve(h * h, np.ones(len(r)), "valid"), 0))
    score = corr / (np.maximum(energy, 0.05 * energy.max()) * np.linalg.norm(r) + 1e-9)
    best = int(np.argmax(score))
    return float(score[best]), best


def line_noise(seconds: float, kind: str, rms: float, seed: int = 7) -> bytes:
    """Caller-side noise without speech, as 8 kHz mu-law."""
    rng = np.random.default_rng(seed)
    n = int(8000 * seconds)
    t = np.arange(n) / 8000
    if kind == "white":
        x = rng.standard_normal(n)
    elif kind == "rumble":
        x = np.cumsum(rng.standard_normal(n))
        x -= np.convolve(x, np.ones(400) / 400, "same")
    elif kind == "hum":
        x = (
            np.sin(2 * np.pi * 60 * t)
            + 0.5 * np.sin(2 * np.pi * 180 * t)
            + 0.2 * rng.standard_normal(n)
        )
    elif kind == "line":
        hum = np.sin(2 * np.pi * 50 * t) + 0.3 * np.sin(2 * np.pi * 150 * t)
        x = hum + 0.5 * rng.standard_normal(n) + 0.02 * np.cumsum(rng.standard_normal(n))
        x -= np.convolve(x, np.ones(800) / 800, "same")
    else:
        raise ValueError(kind)
    x *= rms / np.sqrt(np.mean(x**2))
    return mulaw_encode(np.clip(x, -32768, 32767).astype("<i2").tobytes())
