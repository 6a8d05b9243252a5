"""`telephony simulate` as a user runs it: against `telephony serve echo` in another process,
and with files it cannot read."""

from __future__ import annotations

import os
import subprocess
import sys
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from telephony.audio.wavfile import read_wav, to_phone_audio, write_wav

from .audio_tools import best_correlation, fixture, pcm
from .server import echo_process

CLI = [sys.executable, "-m", "telephony.cli"]


def _speech_wav(path: Path, rate: int) -> np.ndarray:
    """The weather fixture as a stereo WAV at `rate`, as a user's recording might be."""
    x = pcm(fixture("weather"))
    t = np.arange(int(len(x) * rate / 8000)) * 8000 / rate
    y = np.interp(t, np.arange(len(x)), x).astype("<i2")
    write_wav(path, np.stack([y, y], axis=1), rate)
    return x


@pytest.fixture
def echo_server(tmp_path: Path) -> Iterator[str]:
    with echo_process(tmp_path) as (_, url):
        yield url


def test_simulate_against_a_running_echo_server(tmp_path: Path, echo_server: str) -> None:
    speech = _speech_wav(tmp_path / "caller.wav", 22050)
    out = tmp_path / "heard.wav"
    done = subprocess.run(
        [*CLI, "simulate", str(tmp_path / "caller.wav"), "--url", echo_server]
        + ["--settle", "1.5", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "agent turn 1: 0.0" in done.stdout and "before the caller spoke" in done.stdout
    assert "agent turn 2:" in done.stdout and "ms after the caller stopped" in done.stdout
    assert "barge-ins: 0" in done.stdout
    assert "caller audio" in done.stderr  # the progress line
    with wave.open(str(out)) as w:
        assert (w.getnchannels(), w.getframerate()) == (1, 8000)
        heard = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(float)
    # the echo came back, recognisably (its edges may be trimmed a little)
    assert best_correlation(heard, speech[2400:-4000])[0] > 0.9


def test_simulate_the_real_path_against_the_gemini_standin(tmp_path: Path) -> None:
    """The built-in agent, ADK's Gemini model and google-genai's live client, offline."""
    speech = _speech_wav(tmp_path / "caller.wav", 16000)
    out = tmp_path / "heard.wav"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "SSL_CERT"))}
    done = subprocess.run(
        [*CLI, "simulate", str(tmp_path / "caller.wav"), "--gemini-standin"]
        + ["--settle", "1.5", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "agent turn 2:" in done.stdout and "ms after the caller stopped" in done.stdout
    assert "Gemini stand-in: 1 connection(s)" in done.stdout
    # the greeting, and the note of how much of it the caller heard before talking over it
    assert "models/gemini-3.8-live, 2 text turn(s)" in done.stdout
    heard = pcm_wav(out)
    assert best_correlation(heard, speech[2400:-4000])[0] > 0.9


def test_the_gemini_standin_needs_the_in_process_server(tmp_path: Path) -> None:
    _speech_wav(tmp_path / "caller.wav", 8000)
    done = subprocess.run(
        [*CLI, "simulate", str(tmp_path / "caller.wav"), "--gemini-standin"]
        + ["--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "--gemini-standin needs the in-process server" in done.stderr


def pcm_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(float)


def test_reads_any_common_wav(tmp_path: Path) -> None:
    for rate in (8000, 16000, 44100, 48000):
        path = tmp_path / f"{rate}.wav"
        speech = _speech_wav(path, rate)
        samples, got_rate = read_wav(path)
        assert got_rate == rate
        phone = pcm(to_phone_audio(samples, rate))
        assert abs(len(phone) - len(speech)) <= 1
        n = min(len(phone), len(speech))
        assert np.corrcoef(phone[:n], speech[:n])[0, 1] > 0.95
    # mono 8-bit, float and mu-law WAVs as well
    x = pcm(fixture("stop")) / 32768
    for sampwidth, tag, data in (
        (1, 1, ((x * 127) + 128).astype(np.uint8).tobytes()),
        (4, 3, x.astype("<f4").tobytes()),
        (1, 7, fixture("stop")),
    ):
        path = tmp_path / f"fmt{tag}.wav"
        path.write_bytes(_raw_wav(tag, sampwidth, data))
        samples, rate = read_wav(path)
        assert rate == 8000 and np.corrcoef(samples, x)[0, 1] > 0.95


def _raw_wav(tag: int, width: int, data: bytes) -> bytes:
    import struct

    fmt = struct.pack("<HHIIHH", tag, 1, 8000, 8000 * width, width, 8 * width)
    return (
        b"RIFF"
        + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data))
        + b"WAVEfmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello", "not a WAV file"),
        (b"RIFF\x04\x00\x00\x00WAVE", "no fmt chunk"),
        (_raw_wav(6, 1, b"\x00" * 100), "8-bit A-law is not supported"),
    ],
)
def test_says_clearly_what_it_cannot_read(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "x.wav"
    path.write_bytes(content)
    done = subprocess.run([*CLI, "simulate", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stderr
