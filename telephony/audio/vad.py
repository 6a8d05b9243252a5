"""Streaming voice activity detection on 16 kHz PCM16, built on WebRTC's VAD (webrtcvad-wheels).

WebRTC's GMM detector is proven on telephone speech and noise, costs a few microseconds per
frame and needs no model weights. Around it this module adds what a phone needs: any chunk size,
an onset rule (`start_frames` speech frames out of the last `window`) that line noise does not
satisfy, and an end rule (`end_ms` of non-speech).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import webrtcvad

__all__ = ["NoiseFloor", "SpeechEnd", "SpeechStart", "VoiceActivityDetector"]

SAMPLE_RATE = 16000
FRAME_MS = 20
FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000 * 2
FLOOR_RISE = 10 ** (0.05 / 10)
"""The noise floor follows quieter frames at once and louder ones by 0.05 dB a frame (2.5 dB/s)."""
STEADY_FRAMES = 25
STEADY_SPREAD = 10 ** (6 / 10)
"""Energy that stays within 6 dB for 500 ms is noise, not speech (whose syllables swing it far
more): the floor jumps to it, so noise that starts suddenly, after digital silence, counts as
speech for half a second at most rather than until the slow rise catches up."""


class NoiseFloor:
    """The line's background level (frame mean square), by minimum statistics: it follows
    quieter frames at once and louder ones slowly, so speech, however long, barely lifts it."""

    def __init__(self) -> None:
        self.level = 0.0
        self._energies: deque[float] = deque(maxlen=STEADY_FRAMES)

    def observe(self, energy: float) -> float:
        """One frame's mean square (keep it above zero); returns the floor after it."""
        self.level = energy if not self.level else min(energy, self.level * FLOOR_RISE)
        self._energies.append(energy)
        if len(self._energies) == STEADY_FRAMES:
            quietest = min(self._energies)
            if max(self._energies) < quietest * STEADY_SPREAD:
                self.level = max(self.level, quietest)
        return self.level


@dataclass(frozen=True, slots=True)
class SpeechStart:
    """Speech began; `offset_ms` is where its first speech frame starts in the stream."""

    offset_ms: int


@dataclass(frozen=True, slots=True)
class SpeechEnd:
    offset_ms: int


class VoiceActivityDetector:
    """Feeds any amount of audio, reports speech onsets and ends as stream offsets."""

    def __init__(
        self,
        *,
        aggressiveness: int = 3,
        start_frames: int = 4,
        window: int = 6,
        end_ms: int = 600,
        min_snr_db: float = 12.0,
        warmup_ms: int = 200,
    ) -> None:
        if not 0 <= aggressiveness <= 3:
            raise ValueError(f"aggressiveness must be 0-3, got {aggressiveness}")
        if not 1 <= start_frames <= window:
            raise ValueError(f"need 1 <= start_frames <= window, got {start_frames}/{window}")
        self._vad = webrtcvad.Vad(aggressiveness)
        self._start_frames = start_frames
        self._recent: deque[bool] = deque(maxlen=window)
        self._end_frames = max(1, end_ms // FRAME_MS)
        self._pending = b""
        self._frames = 0
        self._silent_run = 0
        self._min_ratio = 10 ** (min_snr_db / 10)
        self._floor = NoiseFloor()
        self._warmup_frames = warmup_ms // FRAME_MS
        self._onset_frame = 0
        self.speaking = False

    @property
    def offset_ms(self) -> int:
        """How much audio has been analysed so far."""
        return self._frames * FRAME_MS

    @property
    def speech_ms(self) -> int:
        """While speaking: from the onset to the end of the last speech frame (else 0)."""
        if not self.speaking:
            return 0
        return (self._frames - self._silent_run - self._onset_frame) * FRAME_MS

    @property
    def silence_ms(self) -> int:
        """While speaking: how long since the last speech frame (the end rule waits `end_ms`;
        else 0)."""
        return self._silent_run * FRAME_MS if self.speaking else 0

    def feed(self, pcm16_16k: bytes, min_energy: float = 0.0) -> list[SpeechStart | SpeechEnd]:
        """`min_energy` (mean square of a frame's samples) gates out quieter frames: what an
        echo of the agent's own voice could reach."""
        data = self._pending + pcm16_16k if self._pending else pcm16_16k
        usable = len(data) - len(data) % FRAME_BYTES
        self._pending = data[usable:]
        events: list[SpeechStart | SpeechEnd] = []
        for i in range(0, usable, FRAME_BYTES):
            frame = data[i : i + FRAME_BYTES]
            is_speech = self._is_speech(frame, min_energy)
            self._frames += 1
            self._recent.append(is_speech)
            if not self.speaking:
                if (
                    is_speech
                    and sum(self._recent) >= self._start_frames
                    and self._frames > self._warmup_frames
                ):
                    self.speaking = True
                    self._silent_run = 0
                    first = len(self._recent) - list(self._recent).index(True)
                    self._onset_frame = self._frames - first
                    events.append(SpeechStart(self._onset_frame * FRAME_MS))
            elif is_speech:
                self._silent_run = 0
            else:
                self._silent_run += 1
                if self._silent_run >= self._end_frames:
                    self.speaking = False
                    self._recent.clear()
                    events.append(SpeechEnd((self._frames - self._silent_run) * FRAME_MS))
        return events

    def _is_speech(self, frame: bytes, min_energy: float) -> bool:
        samples = np.frombuffer(frame, np.int16).astype(np.float32)
        energy = float(np.dot(samples, samples)) / len(samples) + 1.0
        return (
            energy >= self._floor.observe(energy) * self._min_ratio
            and energy >= min_energy
            and self._vad.is_speech(frame, SAMPLE_RATE)
        )

    def end_of_stream(self) -> SpeechEnd | None:
        """The caller's audio stopped: close an utterance in progress."""
        self._pending = b""
        if not self.speaking:
            return None
        self.speaking = False
        self._recent.clear()
        return SpeechEnd((self._frames - self._silent_run) * FRAME_MS)
