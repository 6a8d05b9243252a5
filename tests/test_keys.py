"""Key presses become one turn: on `#`, or after the caller pauses."""

from __future__ import annotations

from telephony.call.keys import KeyBuffer, keys_text


def test_an_entry_ends_with_the_terminator() -> None:
    keys = KeyBuffer(idle_s=2.0)
    assert [keys.press(k, 0.1 * i) for i, k in enumerate("4207")] == [None] * 4
    assert keys.press("#", 0.5) == "4207#"
    assert keys.due(10.0) is None


def test_an_entry_without_terminator_goes_after_a_pause() -> None:
    keys = KeyBuffer(idle_s=2.0)
    keys.press("1", 0.0)
    keys.press("*", 1.0)
    assert keys.due(2.9) is None
    assert keys.due(3.0) == "1*"
    assert keys.due(10.0) is None


def test_a_lone_terminator_is_an_entry() -> None:
    assert KeyBuffer(idle_s=2.0).press("#", 0.0) == "#"


def test_the_text_names_every_key() -> None:
    assert keys_text("4207#") == "(The caller pressed 4207# on the keypad.)"
