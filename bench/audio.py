"""CPU per 20 ms of audio for each converter, beside audioop measured in the same run, plus
the quality figures. Run: python bench/audio.py"""

from __future__ import annotations

import sys
import timeit
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from telephony.audio import NATIVE, InboundConverter, OutboundConverter  # noqa: E402
from tests.audio_tools import tone_amplitude  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

REPEAT = 5


def per_20ms(fn, chunk_ms: int, number: int) -> float:
    best = min(timeit.repeat(fn, number=number, repeat=REPEAT)) / number
    return best * 1e6 * 20 / chunk_ms


def row(direction: str, chunk_ms: int, make, data: bytes, theirs: float, number: int) -> None:
    """One line: the C kernel (if built) and the numpy path, both beside audioop."""
    cells = []
    for native in (True, False) if NATIVE else (False,):
        conv = make(native=native)
        cells.append(per_20ms(lambda conv=conv: conv.convert(data), chunk_ms, number))
    if not NATIVE:
        cells.insert(0, float("nan"))
    c, py = cells
    print(
        f"{direction:9s}  {chunk_ms:3d} ms  {c:9.1f}  {py:9.1f}  {theirs:9.1f}"
        f"  {c / theirs:6.1f}x  {py / theirs:6.1f}x"
    )


def cpu_figures() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, 160, dtype=np.uint8).tobytes()
    state: list[object] = [None]

    def audioop_in() -> None:
        out, state[0] = audioop.ratecv(audioop.ulaw2lin(frame, 2), 2, 1, 8000, 16000, state[0])

    print("us per 20 ms of audio (best of 5); C = telephony's C kernel, numpy = its fallback")
    print("direction  chunk        C      numpy    audioop  C/audioop  numpy/audioop")
    row("inbound", 20, InboundConverter, frame, per_20ms(audioop_in, 20, 5000), 5000)
    for chunk_ms in (20, 40, 200):
        pcm = (rng.standard_normal(24 * chunk_ms) * 3000).astype("<i2").tobytes()
        out_state: list[object] = [None]

        def audioop_out(pcm: bytes = pcm, state: list[object] = out_state) -> None:
            out, state[0] = audioop.ratecv(pcm, 2, 1, 24000, 8000, state[0])
            audioop.lin2ulaw(out, 2)

        theirs = per_20ms(audioop_out, chunk_ms, 2000)
        row("outbound", chunk_ms, OutboundConverter, pcm, theirs, 2000)


def quality_figures() -> None:
    """Measured through the default path (the C kernel when built)."""
    ripple, image = 0.0, -999.0
    for f in range(300, 3401, 10):
        x = 10000 * np.sin(2 * np.pi * f * np.arange(8000) / 8000)
        y = InboundConverter().resampler.process(x)[1600:-1600]
        ripple = max(ripple, abs(20 * np.log10(tone_amplitude(y, f, 16000) / 10000)))
        image = max(image, 20 * np.log10(tone_amplitude(y, 8000 - f, 16000) / 10000))
        x = 10000 * np.sin(2 * np.pi * f * np.arange(24000) / 24000)
        y = OutboundConverter().resampler.process(x)[800:-800]
        ripple = max(ripple, abs(20 * np.log10(tone_amplitude(y, f, 8000) / 10000)))
    alias = -999.0
    for f in range(4000, 12000, 25):
        x = 10000 * np.sin(2 * np.pi * f * np.arange(24000) / 24000)
        y = OutboundConverter().resampler.process(x)[800:-800]
        alias = max(alias, 20 * np.log10(np.sqrt(2 * np.mean(y**2)) / 10000))
    print(f"passband 300-3400 Hz ripple: {ripple:.4f} dB (both directions)")
    print(f"worst image 8k->16k: {image:.1f} dB; worst alias 24k->8k (>= 4 kHz): {alias:.1f} dB")
    print(
        f"added delay: inbound {InboundConverter().delay_ms:.2f} ms, "
        f"outbound {OutboundConverter().delay_ms:.2f} ms"
    )


if __name__ == "__main__":
    cpu_figures()
    quality_figures()
