"""A call's turns as the caller lived them, from its recorded messages: when the caller spoke
(by the bridge's own VAD), when the agent was heard (Twilio's playout, cut by clears), and how
long each answer took. Shared by replays (which compare calls) and call reports (which show
one), so both count turns and latencies the same way."""

from __future__ import annotations

from ..audio import InboundConverter
from ..audio.vad import SpeechEnd, SpeechStart, VoiceActivityDetector

__all__ = ["TURN_GAP_S", "agent_turns", "caller_speech", "playout", "responses"]

TURN_GAP_S = 0.3
"""Agent audio separated by less than this is one turn."""
PLAYOUT_BYTES_PER_S = 8000
"""Twilio plays 8 kHz mu-law: one byte per sample."""


def caller_speech(frames: list[tuple[float, bytes]]) -> list[tuple[float, float]]:
    """Speech segments in the caller's (time, 20 ms mu-law frame) list, by the same VAD the
    bridge uses; an utterance still going at the end lasts to the last frame."""
    vad = VoiceActivityDetector(end_ms=300)
    convert = InboundConverter()
    times = [t for t, _ in frames]
    segments: list[tuple[float, float]] = []
    start: float | None = None
    for _, payload in frames:
        for event in vad.feed(convert.convert(payload)):
            at = times[min(len(times) - 1, event.offset_ms // 20)]
            if isinstance(event, SpeechStart):
                start = at
            elif isinstance(event, SpeechEnd) and start is not None:
                segments.append((start, at))
                start = None
    if start is not None and times:
        segments.append((start, times[-1] + 0.02))
    return segments


def playout(sent: list[tuple[float, int]], clears: list[float]) -> list[tuple[float, float]]:
    """What Twilio played of the media sent as (time, bytes): each message after the previous
    one, cut by clears."""
    pieces: list[tuple[float, float]] = []
    play_end = 0.0
    events = sorted([(t, 0, n) for t, n in sent] + [(t, 1, 0) for t in clears])
    for t, is_clear, nbytes in events:
        if is_clear:
            pieces = [(s, min(e, t)) for s, e in pieces if s < t]
            play_end = t
        else:
            start = max(t, play_end)
            play_end = start + nbytes / PLAYOUT_BYTES_PER_S
            pieces.append((start, play_end))
    return pieces


def agent_turns(pieces: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Played pieces joined into turns (gaps under TURN_GAP_S are within a turn)."""
    turns: list[tuple[float, float]] = []
    for start, end in sorted(p for p in pieces if p[1] > p[0]):
        if turns and start - turns[-1][1] < TURN_GAP_S:
            turns[-1] = (turns[-1][0], max(end, turns[-1][1]))
        else:
            turns.append((start, end))
    return turns


def responses(
    speech: list[tuple[float, float]], turns: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """(end of the caller's speech, start of the agent turn answering it), for each agent turn
    that answers caller speech: one that starts while the caller is silent, after they spoke."""
    out = []
    for start, _ in turns:
        ends = [e for s, e in speech if e <= start]
        talking = any(s <= start < e for s, e in speech)
        if ends and not talking:
            out.append((max(ends), start))
    return out
