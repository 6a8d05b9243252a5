"""What the caller heard of a reply they cut off, and the note that tells the model.

Gemini keeps every word it generated in its context, heard or not, and the Live API has no
truncate (OpenAI's Realtime API has one): after a barge-in the model would go on as if the
caller had heard its whole reply, and ADK stores the whole transcript as said. The player
knows how much of a reply's audio reached the caller's ear; the output transcription says what
the reply's words were; the Live API gives no word timings, so the one is mapped onto the
other in proportion. Pure: the call feeds it and sends the note.
"""

from __future__ import annotations

from dataclasses import dataclass

from .playback import BYTES_PER_SECOND  # agent audio as the player counts it

__all__ = ["BYTES_PER_SECOND", "Note", "Reply"]

MODEL_BYTES_PER_SECOND = 48000
"""Agent audio as the model sends it: 24 kHz, 16-bit."""


@dataclass(frozen=True)
class Note:
    heard: str
    """The words of the reply the caller heard (as far as proportion tells)."""
    unheard: str
    heard_s: float
    generated_s: float

    @property
    def text(self) -> str:
        """What the model is told: its own words, so it can pick up where the caller stopped
        hearing (or repeat what mattered) instead of believing it was all said."""
        if not self.heard and not self.unheard:
            return (
                f"(The caller interrupted you after hearing {self.heard_s:.1f} s of your "
                f"{self.generated_s:.1f} s reply.)"
            )
        if not self.heard:
            return (
                "(The caller interrupted you before hearing any of your last reply. "
                f'They did not hear: "{self.unheard}")'
            )
        return (
            "(The caller interrupted you. Of your last reply they heard only: "
            f'"{self.heard}". They did not hear: "{self.unheard}")'
        )

    def record(self) -> dict[str, object]:
        """Kept with the note in the session, so history and reports can mark what the
        caller never heard."""
        return {
            "heard": self.heard,
            "unheard": self.unheard,
            "heard_s": round(self.heard_s, 2),
            "generated_s": round(self.generated_s, 2),
        }


class Reply:
    """One turn of the model's: its audio and transcript as they arrive, and where the caller
    stopped hearing it, if they did."""

    def __init__(self, start: int) -> None:
        self.start = start
        """Where its first audio lies among all the agent audio the player has queued
        (bytes), whether it is played or discarded."""
        self.generated_s = 0.0
        """All the audio the model generated for it, played or not: what its transcript
        covers."""
        self.transcript = ""
        self.done = False
        """The model has stopped generating it (complete, interrupted, or its session gone)."""
        self.heard_to: int | None = None
        """Where the caller stopped hearing agent audio (same scale as `start`) when they cut
        it off; None while they have not."""

    def audio(self, nbytes: int) -> None:
        """A chunk of the model's audio (24 kHz 16-bit bytes)."""
        self.generated_s += nbytes / MODEL_BYTES_PER_SECOND

    def transcribed(self, text: str, *, finished: bool) -> None:
        """A piece of the output transcription, or the whole of it once finished."""
        self.transcript = text if finished else self.transcript + text

    def note(self) -> Note | None:
        """Once the caller cut it off and the model is done with it: what they heard, or None
        when they heard it all (or it was not cut off)."""
        if not self.done or self.heard_to is None:
            return None
        heard_s = max(0, self.heard_to - self.start) / BYTES_PER_SECOND
        if self.generated_s <= 0 or heard_s >= self.generated_s:
            return None
        words = self.transcript.split()
        n = round(len(words) * heard_s / self.generated_s)
        if words and n == len(words):
            return None
        return Note(" ".join(words[:n]), " ".join(words[n:]), heard_s, self.generated_s)
