"""What the caller heard of a reply they cut off, in values: no call, no model."""

from __future__ import annotations

from telephony.call.heard import BYTES_PER_SECOND, Reply

SECOND = 48000
"""One second of the model's audio (24 kHz, 16-bit)."""


def _reply(*, generated_s: float, words: str, heard_s: float, start: int = 16000) -> Reply:
    reply = Reply(start)
    reply.audio(int(generated_s * SECOND))
    reply.transcribed(words, finished=True)
    reply.heard_to = start + int(heard_s * BYTES_PER_SECOND)
    return reply


def test_the_words_heard_are_those_of_the_audio_heard_in_proportion() -> None:
    reply = _reply(generated_s=4.0, words="one two three four five six seven eight", heard_s=1.0)
    assert reply.note() is None  # the model is still generating: the words may grow
    reply.done = True
    note = reply.note()
    assert note is not None
    assert (note.heard, note.unheard) == ("one two", "three four five six seven eight")
    assert note.text == (
        '(The caller interrupted you. Of your last reply they heard only: "one two". '
        'They did not hear: "three four five six seven eight")'
    )
    assert note.record() == {
        "heard": "one two",
        "unheard": "three four five six seven eight",
        "heard_s": 1.0,
        "generated_s": 4.0,
    }


def test_partial_transcripts_add_up_until_the_finished_one_replaces_them() -> None:
    reply = Reply(0)
    reply.transcribed("Hello", finished=False)
    reply.transcribed(" there", finished=False)
    assert reply.transcript == "Hello there"
    reply.transcribed("Hello there, caller", finished=True)
    assert reply.transcript == "Hello there, caller"


def test_nothing_to_tell_when_the_caller_heard_it_all_or_never_cut_it_off() -> None:
    whole = _reply(generated_s=2.0, words="all of it", heard_s=2.0)
    whole.done = True
    assert whole.note() is None
    nearly = _reply(generated_s=2.0, words="all of it", heard_s=1.9)  # the last word rounds in
    nearly.done = True
    assert nearly.note() is None
    never = Reply(0)
    never.audio(SECOND)
    never.done = True
    assert never.note() is None


def test_cut_off_before_any_of_it_was_heard() -> None:
    reply = _reply(generated_s=3.0, words="a reply nobody heard", heard_s=-0.5)
    reply.done = True
    note = reply.note()
    assert note is not None and note.heard == "" and note.heard_s == 0
    assert note.text.startswith("(The caller interrupted you before hearing any")


def test_without_a_transcript_the_note_says_how_much_was_heard() -> None:
    reply = _reply(generated_s=3.0, words="", heard_s=1.2)
    reply.done = True
    note = reply.note()
    assert note is not None
    assert note.text == "(The caller interrupted you after hearing 1.2 s of your 3.0 s reply.)"
