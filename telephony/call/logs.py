"""One log line per call event, prefixed with the call SID, and kept free of what identifies
the caller when the operator asks (`TELEPHONY_MASK_CALLERS`)."""

from __future__ import annotations

import logging

__all__ = ["CallLogger", "mask_number"]

log = logging.getLogger("telephony.call")


def mask_number(number: str) -> str:
    """+15551234567 -> +*******4567: enough to tell calls apart in logs, not to call back."""
    digits = sum(c.isdigit() for c in number)
    if digits <= 4:
        return "*" * len(number)
    seen = 0
    out = []
    for c in number:
        if c.isdigit():
            seen += 1
            out.append(c if seen > digits - 4 else "*")
        else:
            out.append(c)
    return "".join(out)


class CallLogger:
    """What a call logs goes through here, so no line forgets its call SID or the masking."""

    def __init__(self, call_sid: str, *, mask: bool) -> None:
        self.call_sid = call_sid
        self.mask = mask

    def __call__(self, message: str, *args: object, level: int = logging.INFO) -> None:
        log.log(level, "call %s: " + message, self.call_sid, *args)

    def number(self, number: str) -> str:
        return mask_number(number) if self.mask else number

    def words(self, text: str) -> str:
        return f"({len(text)} characters)" if self.mask else text

    def keys(self, keys: str) -> str:
        if not self.mask:
            return keys
        return "a key" if len(keys) == 1 else f"{len(keys)} keys"
