"""Streaming audio conversion between Twilio (8 kHz G.711 mu-law) and Gemini Live (PCM16).

Both directions run one polyphase FIR per call, so the audio is anti-aliased, the chunk
edges never click, and each input chunk yields its share of output at once (no bursts).
Pure: bytes in, bytes out, no I/O. Each converter instance carries one call's state.
"""

from __future__ import annotations

import functools

import numpy as np

try:
    from . import _fir
except ImportError:  # built without a C compiler: numpy does the same filtering, slower
    _fir = None

NATIVE = _fir is not None
"""Whether the C kernel is built; converters use it unless given native=False."""

__all__ = [
    "NATIVE",
    "InboundConverter",
    "OutboundConverter",
    "PcmResampler",
    "Resampler",
    "mulaw_decode",
    "mulaw_encode",
]


def _mulaw_decode_table() -> np.ndarray:
    """G.711 expansion of every byte, as audioop.ulaw2lin computes it."""
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _mulaw_encode_table() -> np.ndarray:
    """G.711 compression of every int16 (indexed by its uint16 bit pattern), as audioop.lin2ulaw."""
    pcm = np.arange(65536, dtype=np.uint16).view(np.int16).astype(np.int32) >> 2
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), 8159) + 33
    seg = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), mag)
    code = (seg << 4) | ((mag >> (seg + 1)) & 0x0F)
    return (np.where(seg >= 8, 0x7F, code) ^ mask).astype(np.uint8)


_DECODE = _mulaw_decode_table()
_DECODE_F = _DECODE.astype(np.float32)
_ENCODE = _mulaw_encode_table()
_DECODE_F_BYTES = _DECODE_F.tobytes()
_ENCODE_BYTES = _ENCODE.tobytes()
"""The tables as the C kernel takes them: one copy shared by every call (64 KiB each)."""


def mulaw_decode(data: bytes) -> bytes:
    """mu-law bytes -> PCM16 LE, bit-identical to audioop.ulaw2lin(data, 2)."""
    return _DECODE[np.frombuffer(data, np.uint8)].astype("<i2").tobytes()


def mulaw_encode(pcm16: bytes) -> bytes:
    """PCM16 LE -> mu-law bytes, bit-identical to audioop.lin2ulaw(data, 2)."""
    return _ENCODE[np.frombuffer(pcm16, "<u2")].tobytes()


def kaiser_lowpass(taps: int, cutoff: float, attenuation_db: float, gain: float) -> np.ndarray:
    """Windowed-sinc low-pass; cutoff is a fraction of the (upsampled) sample rate."""
    if attenuation_db > 50:
        beta = 0.1102 * (attenuation_db - 8.7)
    else:
        beta = 0.5842 * (attenuation_db - 21) ** 0.4 + 0.07886 * (attenuation_db - 21)
    n = np.arange(taps) - (taps - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(taps, beta)
    return h * (gain / h.sum())


@functools.lru_cache(maxsize=16)
def _polyphase_weights(up: int, down: int, taps_bytes: bytes) -> np.ndarray:
    """The (up x window) matrix of a filter, built once per filter and shared by every call."""
    taps = np.frombuffer(taps_bytes, np.float64)
    k = len(taps)
    width = -(-k // up) + down
    weights = np.zeros((up, width))
    for r in range(up):
        for j in range(width):
            idx = r * down + (width - down - j) * up
            if 0 <= idx < k:
                weights[r, j] = taps[idx]
    # Columns contiguous: np.dot then runs one BLAS dot per output over strided windows.
    # float32: its rounding error sits far below the 16-bit output's LSB, and it halves
    # the memory each per-output dot product reads.
    weights = weights.astype(np.float32)
    weights.flags.writeable = False
    return weights


class Resampler:
    """Streaming rational resampler (up/down) built on one polyphase FIR.

    Outputs come in blocks of `up` samples, one per `down` inputs; each block is one row of a
    strided window over the input times a fixed (window x up) matrix, so a whole chunk costs a
    single matrix product however the phases fall. With `native` (the default when built) the
    C kernel runs the same arithmetic, fused with G.711 and PCM16 packing in the converters.
    """

    def __init__(self, up: int, down: int, taps: np.ndarray, *, native: bool | None = None) -> None:
        native = NATIVE if native is None else native
        if native and _fir is None:
            raise RuntimeError("the C audio kernel (telephony._fir) is not built")
        self.up, self.down = up, down
        weights = _polyphase_weights(up, down, np.asarray(taps, np.float64).tobytes())
        self._width = weights.shape[1]
        self.kernel = (
            _fir.Polyphase(up, down, weights.tobytes(), _DECODE_F_BYTES, _ENCODE_BYTES)
            if native
            else None
        )
        self._weights = weights.T if up > 1 else weights[0]
        self._tail = np.zeros(self._width - down, np.float32)
        self.flush_samples = self._width - 1
        """Zeros that push out every output the input so far contributes to: the longest
        history the filter keeps."""
        self.delay_samples_in = (len(taps) - 1) / 2 / up
        """Group delay, in input samples."""

    def process(self, x: np.ndarray) -> np.ndarray:
        """Feed input samples (any count); return every output sample they complete."""
        if self.kernel is not None:
            out = self.kernel.process(np.ascontiguousarray(x, np.float32).tobytes())
            return np.frombuffer(out, np.float32)
        buf = np.concatenate((self._tail, x), dtype=np.float32)
        blocks = (len(buf) - self._width) // self.down + 1
        if blocks <= 0:
            self._tail = buf
            return np.empty(0, np.float32)
        windows = np.ndarray(
            (blocks, self._width), np.float32, buffer=buf, strides=(4 * self.down, 4)
        )
        y = np.dot(windows, self._weights)
        self._tail = buf[blocks * self.down :]
        return y.reshape(-1)


def to_int16(y: np.ndarray) -> np.ndarray:
    """Round and saturate in place (np.clip is several times slower than the two ufuncs)."""
    np.rint(y, out=y)
    np.maximum(y, -32768.0, out=y)
    np.minimum(y, 32767.0, out=y)
    return y.astype(np.int16)


# 8 kHz -> 16 kHz: passband to 3.4 kHz, images from 4.6 kHz down >= 80 dB.
_UP2 = kaiser_lowpass(75, 4000 / 16000, 88, gain=2.0)
# 24 kHz -> 8 kHz: passband to 3.4 kHz, everything that would alias (>= 4 kHz) down >= 80 dB.
_DOWN3 = kaiser_lowpass(231, 3700 / 24000, 86, gain=1.0)
# 16 kHz -> 24 kHz (the simulated model's echo): passband to 7 kHz.
_UP3_DOWN2 = kaiser_lowpass(145, 7600 / 48000, 80, gain=3.0)


class _Pcm16Samples:
    """PCM16 LE bytes -> samples, keeping the half sample of an odd-length chunk for the next."""

    def __init__(self) -> None:
        self._odd = b""

    def take(self, data: bytes) -> np.ndarray:
        if self._odd:
            data = self._odd + data
        usable = len(data) & ~1
        self._odd = data[usable:]
        return np.frombuffer(data, "<i2", count=usable // 2)


class InboundConverter:
    """Caller audio: 8 kHz mu-law -> 16 kHz PCM16 LE, for Gemini Live."""

    IN_RATE = 8000
    OUT_RATE = 16000

    def __init__(self, *, native: bool | None = None) -> None:
        self.resampler = Resampler(2, 1, _UP2, native=native)
        self.delay_ms = 1000 * self.resampler.delay_samples_in / self.IN_RATE

    def convert(self, mulaw_8k: bytes) -> bytes:
        if self.resampler.kernel is not None:
            return self.resampler.kernel.ulaw_to_pcm16(mulaw_8k)
        x = _DECODE_F.take(np.frombuffer(mulaw_8k, np.uint8))
        return to_int16(self.resampler.process(x)).tobytes()


class OutboundConverter:
    """Agent audio: 24 kHz PCM16 LE -> 8 kHz mu-law, for Twilio. Odd byte counts are fine."""

    IN_RATE = 24000
    OUT_RATE = 8000

    def __init__(self, *, native: bool | None = None) -> None:
        self._native = NATIVE if native is None else native
        self._restart()
        self.delay_ms = 1000 * self.resampler.delay_samples_in / self.IN_RATE

    def _restart(self) -> None:
        self.resampler = Resampler(1, 3, _DOWN3, native=self._native)
        self._samples = _Pcm16Samples()
        self._fed = False

    def convert(self, pcm16_24k: bytes) -> bytes:
        self._fed = self._fed or bool(pcm16_24k)
        if self.resampler.kernel is not None:
            return self.resampler.kernel.pcm16_to_ulaw(pcm16_24k)
        y = to_int16(self.resampler.process(self._samples.take(pcm16_24k)))
        return _ENCODE[y.view(np.uint16)].tobytes()

    def flush(self) -> bytes:
        """Ends a stretch of audio (one reply of the model's): returns the rest of it, which
        the filter still holds, and starts the next from silence (b"" when nothing was fed).

        The filter returns each output `delay_ms` late, and only once later input pushes it
        out. The model's replies reach us back to back, without the silence between them: left
        in, a reply's last milliseconds would play at the start of the next (a click), cut off
        from the reply they end."""
        if not self._fed:
            return b""
        rest = self.convert(bytes(2 * self.resampler.flush_samples))
        self._restart()
        return rest


class PcmResampler:
    """PCM16 LE at one rate -> PCM16 LE at another (used by the simulated model's echo)."""

    def __init__(self, up: int = 3, down: int = 2, *, native: bool | None = None) -> None:
        if (up, down) != (3, 2):
            raise ValueError(f"only 16 kHz -> 24 kHz (3/2) is built in, not {up}/{down}")
        self.resampler = Resampler(up, down, _UP3_DOWN2, native=native)
        self._samples = _Pcm16Samples()

    def convert(self, pcm16: bytes) -> bytes:
        if self.resampler.kernel is not None:
            return self.resampler.kernel.pcm16_to_pcm16(pcm16)
        return to_int16(self.resampler.process(self._samples.take(pcm16))).tobytes()
