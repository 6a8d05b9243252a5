"""WAV files in and out of the phone format: any common WAV -> 8 kHz mu-law, PCM16 -> WAV.

The reader parses RIFF itself because the stdlib `wave` module reads integer PCM only,
while WAVs in the wild are also float, mu-law (telephony's own) or WAVE_FORMAT_EXTENSIBLE.
"""

from __future__ import annotations

import math
import struct
import wave
from pathlib import Path

import numpy as np

from .convert import Resampler, kaiser_lowpass, mulaw_decode, mulaw_encode, to_int16

__all__ = ["WavError", "read_wav", "to_phone_audio", "write_wav"]

PCM, FLOAT, ALAW, MULAW, EXTENSIBLE = 1, 3, 6, 7, 0xFFFE
PHONE_RATE = 8000


class WavError(ValueError):
    """A file that is not a WAV this reader understands; the message says what it found."""


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Samples as float32 in int16 scale, channels mixed to mono, and the sample rate."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise WavError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise WavError(f"{path}: not a WAV file (no RIFF/WAVE header)")
    fmt: tuple[int, int, int, int] | None = None
    samples: bytes | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = data[pos + 8 : pos + 8 + size]
        if chunk_id == b"fmt ":
            if len(body) < 16:
                raise WavError(f"{path}: fmt chunk too short ({len(body)} bytes)")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == EXTENSIBLE and len(body) >= 26:
                tag = struct.unpack_from("<H", body, 24)[0]
            fmt = (tag, channels, rate, bits)
        elif chunk_id == b"data":
            samples = body
        pos += 8 + size + (size & 1)
    if fmt is None or samples is None:
        raise WavError(f"{path}: no {'fmt' if fmt is None else 'data'} chunk")
    tag, channels, rate, bits = fmt
    if channels < 1 or rate < 1:
        raise WavError(f"{path}: {channels} channels at {rate} Hz makes no sense")
    x = _decode(tag, bits, samples, path)
    usable = len(x) - len(x) % channels
    mono = x[:usable].reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return mono.astype(np.float32), rate


def _decode(tag: int, bits: int, raw: bytes, path: Path) -> np.ndarray:
    if tag == PCM and bits == 8:
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) * 256
    if tag == PCM and bits in (16, 24, 32):
        width = bits // 8
        raw = raw[: len(raw) - len(raw) % width]
        if bits == 24:
            b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
            v = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8
            return v.astype(np.float32) / 256
        v = np.frombuffer(raw, f"<i{width}").astype(np.float32)
        return v if bits == 16 else v / 65536
    if tag == FLOAT and bits in (32, 64):
        raw = raw[: len(raw) - len(raw) % (bits // 8)]
        return np.frombuffer(raw, f"<f{bits // 8}").astype(np.float32) * 32767
    if tag == MULAW and bits == 8:
        return np.frombuffer(mulaw_decode(raw), np.int16).astype(np.float32)
    names = {PCM: "integer PCM", FLOAT: "float", ALAW: "A-law", MULAW: "mu-law"}
    kind = names.get(tag, f"format tag 0x{tag:04x}")
    raise WavError(
        f"{path}: {bits}-bit {kind} is not supported "
        "(use 8/16/24/32-bit PCM, 32/64-bit float or 8-bit mu-law)"
    )


def to_phone_audio(samples: np.ndarray, rate: int) -> bytes:
    """Any rate -> 8 kHz mu-law, anti-aliased (a polyphase FIR for the exact ratio)."""
    if rate != PHONE_RATE:
        g = math.gcd(rate, PHONE_RATE)
        up, down = PHONE_RATE // g, rate // g
        # Passband to 95% of the lower Nyquist frequency, 60 dB down at 105% (Kaiser's
        # length estimate for that transition, at the upsampled rate).
        edge_hz = min(rate, PHONE_RATE) / 2
        length = int(52 / (2.285 * 2 * math.pi * 0.1 * edge_hz / (rate * up))) | 1
        taps = kaiser_lowpass(length, edge_hz * 0.95 / (rate * up), 60, gain=float(up))
        resampler = Resampler(up, down, taps)
        delay = round(resampler.delay_samples_in * up / down)
        pad = len(taps) // up + 2 * down + 8  # flushes the filter past the last sample
        padded = np.concatenate((samples, np.zeros(pad, np.float32)))
        out = resampler.process(padded)
        n = len(samples) * up // down
        samples = out[delay : delay + n].copy()
    return mulaw_encode(to_int16(np.asarray(samples, np.float32).copy()).tobytes())


def write_wav(path: str | Path, pcm16: np.ndarray, rate: int = PHONE_RATE) -> None:
    """int16 samples, shape (n,) or (n, channels)."""
    channels = 1 if pcm16.ndim == 1 else pcm16.shape[1]
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(np.ascontiguousarray(pcm16, "<i2").tobytes())
