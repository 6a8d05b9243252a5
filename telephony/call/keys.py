"""Key presses gathered into one turn for the model, the way ADK's own LiveKit bridge does.

Each key sent as a turn of its own would start a model turn per key, each interrupting the
last ("4207#" made five). Keys wait here until the caller presses a terminator or pauses;
then the whole entry goes to the model at once. Pure: the call feeds presses and the time.
"""

from __future__ import annotations

__all__ = ["KeyBuffer", "keys_text"]

TERMINATORS = frozenset("#")
"""As in ADK's LiveKit bridge: `#` ends an entry; `*` is part of it (often "back" or "star")."""


def keys_text(keys: str) -> str:
    return f"(The caller pressed {keys} on the keypad.)"


class KeyBuffer:
    """The keys of one entry so far; the call asks it on every key and every watch tick."""

    def __init__(self, *, idle_s: float) -> None:
        self.idle_s = idle_s
        self._keys: list[str] = []
        self._last = 0.0

    def press(self, key: str, now: float) -> str | None:
        """The entry to send now (the caller pressed a terminator), else None."""
        self._keys.append(key)
        self._last = now
        return self._take() if key in TERMINATORS else None

    def due(self, now: float) -> str | None:
        """The entry to send now (the caller stopped pressing keys), else None."""
        if self._keys and now - self._last >= self.idle_s:
            return self._take()
        return None

    def _take(self) -> str:
        keys, self._keys = "".join(self._keys), []
        return keys
