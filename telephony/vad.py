"""Streaming voice activity detection on 16 kHz PCM16, built on WebRTC's VAD (webrtcvad-wheels).

WebRTC's GMM detector is proven on telephone speech and noise, costs a few microseconds per
frame and needs no model weights. Around it this module adds what a phone needs: any chunk size,
an onset rule (`start_frames` speech frames out of the last `window`) that line noise does not
satisfy, and an end rule (`end_ms` of non-speech).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import webrtcvad

__all__ = ["SpeechEnd", "SpeechStart", "VoiceActivityDetector"]

SAMPLE_RATE = 16000
FRAME_MS = 20
FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000 * 2


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
        self.speaking = False

    @property
    def offset_ms(self) -> int:
        """How much audio has been analysed so far."""
        return self._frames * FRAME_MS

    def feed(self, pcm16_16k: bytes) -> list[SpeechStart | SpeechEnd]:
        data = self._pending + pcm16_16k if self._pending else pcm16_16k
        usable = len(data) - len(data) % FRAME_BYTES
        self._pending = data[usable:]
        events: list[SpeechStart | SpeechEnd] = []
        for i in range(0, usable, FRAME_BYTES):
            is_speech = self._vad.is_speech(data[i : i + FRAME_BYTES], SAMPLE_RATE)
            self._frames += 1
            self._recent.append(is_speech)
            if not self.speaking:
                if is_speech and sum(self._recent) >= self._start_frames:
                    self.speaking = True
                    self._silent_run = 0
                    first = len(self._recent) - list(self._recent).index(True)
                    events.append(SpeechStart((self._frames - first) * FRAME_MS))
            elif is_speech:
                self._silent_run = 0
            else:
                self._silent_run += 1
                if self._silent_run >= self._end_frames:
                    self.speaking = False
                    self._recent.clear()
                    events.append(SpeechEnd((self._frames - self._silent_run) * FRAME_MS))
        return events

    def end_of_stream(self) -> SpeechEnd | None:
        """The caller's audio stopped: close an utterance in progress."""
        self._pending = b""
        if not self.speaking:
            return None
        self.speaking = False
        self._recent.clear()
        return SpeechEnd((self._frames - self._silent_run) * FRAME_MS)
