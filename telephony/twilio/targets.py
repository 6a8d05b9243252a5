"""Where an agent may send a caller, and which keys it may press: checked before Twilio is
asked, with messages a model can relay to the caller."""

from __future__ import annotations

import re

__all__ = ["AllowList", "TargetError", "key_digits", "transfer_target"]

_E164 = re.compile(r"\+[1-9]\d{6,14}")
_SIP_URI = re.compile(r"sips?:[^@\s<>\"]+@(?P<host>[A-Za-z0-9.-]+)(:\d{1,5})?(;[^\s<>\"]*)?")
_DIGITS = re.compile(r"[0-9*#wW]{1,64}")
_SPOKEN_SEPARATORS = str.maketrans("", "", " -().")


class TargetError(ValueError):
    """A transfer target or key sequence that cannot be used; the message says why, in words
    the model can pass on."""


def transfer_target(text: str) -> str:
    """An E.164 number (spaces, dashes, dots and brackets dropped, `tel:` too) or a SIP URI."""
    target = text.strip()
    if target.startswith(("sip:", "sips:")):
        if _SIP_URI.fullmatch(target) is None:
            raise TargetError(f"{text!r} is not a SIP address like sip:desk@example.com")
        return target
    number = target.removeprefix("tel:").translate(_SPOKEN_SEPARATORS)
    if _E164.fullmatch(number) is None:
        raise TargetError(
            f"{text!r} is not a phone number in international form, like +15551234567"
        )
    return number


def key_digits(text: str) -> str:
    """Keys for `<Play digits>`: 0-9, * and #, with w (half a second) and W (one second)
    pauses; at most 64."""
    digits = text.strip()
    if _DIGITS.fullmatch(digits) is None:
        raise TargetError(
            f"{text!r} cannot be pressed: use only 0-9, * and # (w or W to pause), at most 64 keys"
        )
    return digits


class AllowList:
    """Where transfers may go: exact numbers (`+15551234567`), number prefixes (`+1800*`), SIP
    URIs (`sip:desk@example.com`) and whole SIP domains (`@example.com`). Empty: nowhere."""

    def __init__(self, entries: list[str]) -> None:
        self._entries = [entry.strip() for entry in entries if entry.strip()]
        for entry in self._entries:
            if entry.startswith("@"):
                continue
            bare = entry.removesuffix("*")
            if entry.endswith("*") and re.fullmatch(r"\+\d{1,14}", bare) is None:
                raise TargetError(f"{entry!r}: a prefix is + and digits, then *")
            if not entry.endswith("*"):
                transfer_target(entry)

    @classmethod
    def parse(cls, text: str) -> AllowList:
        return cls(text.split(","))

    def __bool__(self) -> bool:
        return bool(self._entries)

    def allows(self, target: str) -> bool:
        host = (m["host"] or "") if (m := _SIP_URI.fullmatch(target)) else None
        for entry in self._entries:
            if entry.startswith("@"):
                if host is not None and host.lower() == entry[1:].lower():
                    return True
            elif entry.endswith("*"):
                if host is None and target.startswith(entry[:-1]):
                    return True
            elif entry == target:
                return True
        return False
