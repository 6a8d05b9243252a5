"""Pure audio: phone <-> model conversion (with its optional C kernel), voice activity
detection, echo suppression and WAV I/O. Bytes in, bytes out; nothing here knows of calls,
sockets or ADK."""

from .convert import (
    NATIVE,
    InboundConverter,
    OutboundConverter,
    PcmResampler,
    Resampler,
    mulaw_decode,
    mulaw_encode,
)

__all__ = [
    "NATIVE",
    "InboundConverter",
    "OutboundConverter",
    "PcmResampler",
    "Resampler",
    "mulaw_decode",
    "mulaw_encode",
]
