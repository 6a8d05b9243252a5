"""The C kernel against the numpy path it replaces: same output, same state handling."""

from __future__ import annotations

import numpy as np
import pytest

from telephony.audio import NATIVE, InboundConverter, OutboundConverter, PcmResampler

from .audio_tools import fixture

pytestmark = pytest.mark.skipif(not NATIVE, reason="the C kernel is not built here")


def _speech24() -> bytes:
    return PcmResampler(native=False).convert(
        InboundConverter(native=False).convert(fixture("weather"))
    )


def _feed(convert, data: bytes, size: int) -> bytes:
    return b"".join(convert(data[i : i + size]) for i in range(0, len(data), size))


@pytest.mark.parametrize("size", [1, 160, 333])
def test_inbound_matches_numpy_within_one_lsb(size: int) -> None:
    speech = fixture("hello")
    c = np.frombuffer(_feed(InboundConverter(native=True).convert, speech, size), np.int16)
    py = np.frombuffer(_feed(InboundConverter(native=False).convert, speech, size), np.int16)
    assert len(c) == len(py) == 2 * len(speech)
    assert np.max(np.abs(c.astype(int) - py)) <= 1


@pytest.mark.parametrize("size", [1, 961, 4800])
def test_outbound_matches_numpy_within_one_code(size: int) -> None:
    speech24 = _speech24()
    c = np.frombuffer(_feed(OutboundConverter(native=True).convert, speech24, size), np.uint8)
    py = np.frombuffer(_feed(OutboundConverter(native=False).convert, speech24, size), np.uint8)
    assert len(c) == len(py) == len(speech24) // 6
    assert np.max(np.abs(c.astype(int) - py)) <= 1
    assert np.mean(c == py) > 0.99


def test_echo_resampler_matches_numpy_within_one_lsb() -> None:
    pcm16 = InboundConverter().convert(fixture("stop"))
    c = np.frombuffer(_feed(PcmResampler(native=True).convert, pcm16, 641), np.int16)
    py = np.frombuffer(_feed(PcmResampler(native=False).convert, pcm16, 641), np.int16)
    assert len(c) == len(py)
    assert np.max(np.abs(c.astype(int) - py)) <= 1


def test_rounding_and_saturation_match_numpy() -> None:
    """Full-scale square waves overshoot the filter and must clip, not wrap."""
    square = np.tile(np.repeat(np.array([32767, -32768], "<i2"), 30), 400).tobytes()
    c = np.frombuffer(OutboundConverter(native=True).convert(square), np.uint8)
    py = np.frombuffer(OutboundConverter(native=False).convert(square), np.uint8)
    assert np.array_equal(c, py)
    loud = np.frombuffer(PcmResampler(native=True).convert(square), np.int16)
    assert loud.max() == 32767 and loud.min() == -32768


def test_kernel_rejects_bad_construction_and_input() -> None:
    from telephony.audio import _fir

    good = dict(decode=bytes(1024), encode=bytes(65536))
    with pytest.raises(ValueError, match="positive"):
        _fir.Polyphase(0, 1, bytes(16), **good)
    with pytest.raises(ValueError, match="rows"):
        _fir.Polyphase(2, 1, bytes(12), **good)
    with pytest.raises(ValueError, match="wider"):
        _fir.Polyphase(1, 3, bytes(8), **good)
    with pytest.raises(ValueError, match="256"):
        _fir.Polyphase(1, 1, bytes(16), decode=bytes(10), encode=bytes(65536))
    with pytest.raises(RuntimeError, match="initialised"):
        _fir.Polyphase.__new__(_fir.Polyphase).process(b"")
    kernel = _fir.Polyphase(1, 1, bytes(16), **good)
    with pytest.raises(ValueError, match="multiple of 4"):
        kernel.process(b"abc")
    with pytest.raises(TypeError):
        kernel.ulaw_to_pcm16("text")
