"""`telephony simulate CALLER.wav`: one simulated phone call, start to end, with a report.

The caller side says the WAV (once, after a second for the greeting), keys in any digits,
waits for the agent to finish, and hangs up; what the caller heard goes to a WAV and a
per-turn summary is printed. The line and the caller can be made more realistic: network
delay, echo, a caller who says "mm-hm" or coughs into the agent's reply.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..audio.wavfile import read_wav, to_phone_audio, write_wav
from ..settings import Settings
from .gemini_live import ConnectionRecord
from .replay import CallFigures, figures_from_log
from .simulator import (
    DIGITS,
    CallerSimulator,
    Echo,
    Interjection,
    Network,
    WebhookError,
    place_call,
)

__all__ = ["SimulatedCall", "format_standin", "format_summary", "simulate_call"]

GREETING_S = 1.0
PROGRESS_EVERY_S = 0.25


@dataclass
class SimulatedCall:
    call_sid: str
    duration_s: float
    figures: CallFigures
    heard: np.ndarray
    """What the caller heard, 8 kHz int16, from the stream's start."""
    interjections: list[tuple[float, str]] = field(default_factory=list)
    """When the caller said "mm-hm" or coughed (s from the stream's start), and which."""
    keys: list[tuple[float, str]] = field(default_factory=list)
    """When the caller pressed which key (s from the stream's start)."""


async def simulate_call(
    wav: str | Path,
    *,
    url: str = "",
    app: Any = None,
    auth_token: str = "",
    public_url: str = "",
    settle_s: float = 3.0,
    max_s: float = 300.0,
    progress: TextIO | None = None,
    network: Network | None = None,
    echo: Echo | None = None,
    interjections: Sequence[Interjection] = (),
    keys: str = "",
    key_gap_s: float = 0.1,
) -> SimulatedCall:
    """Places the call; raises WavError before dialling if the WAV cannot be read. `keys`
    are pressed `key_gap_s` apart once the caller has said the WAV."""
    audio = to_phone_audio(*read_wav(wav))
    spoken_s = len(audio) / 8000
    loop = asyncio.get_running_loop()
    async with place_call(
        url,
        app=app,
        auth_token=auth_token,
        public_url=public_url,
        network=network,
        echo=echo,
        interjections=interjections,
    ) as sim:
        reporter = asyncio.create_task(_report(sim, spoken_s, progress)) if progress else None
        try:
            await asyncio.sleep(GREETING_S)
            await sim.say(audio)
            await sim.finish_speaking()
            await sim.press_keys(keys, key_gap_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(sim.log.started + max_s):
                    await sim.agent_quiet(settle_s, since=loop.time())
            duration = loop.time() - sim.log.started
            await sim.hang_up()
        finally:
            if reporter is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
                progress.write("\n")  # type: ignore[union-attr]
    started = sim.log.started
    return SimulatedCall(
        sim.call_sid,
        duration,
        figures_from_log(sim.log),
        sim.log.heard_pcm(),
        [(t - started, what) for t, what in sim.log.interjections],
        [(t - started, key) for t, key in sim.log.keys],
    )


async def _report(sim: CallerSimulator, spoken_s: float, out: TextIO) -> None:
    loop = asyncio.get_running_loop()
    tty = out.isatty()
    every = PROGRESS_EVERY_S if tty else 2.0
    while True:
        await asyncio.sleep(every)
        sent = sum(len(p) for _, p in sim.log.sent) / 8000
        heard = sum(len(h.audio) for h in sim.log.heard) / 8000
        line = (
            f"[{loop.time() - sim.log.started:6.1f} s] caller audio {min(sent, spoken_s):.1f}"
            f"/{spoken_s:.1f} s, agent audio heard {heard:.1f} s, clears {len(sim.log.clears)}"
        )
        out.write(("\r" + line) if tty else (line + "\n"))
        out.flush()


def format_summary(call: SimulatedCall) -> str:
    f = call.figures
    lines = [f"call {call.call_sid}: {call.duration_s:.1f} s"]
    events: list[tuple[float, str]] = [
        (s, f"caller spoke {s:.2f}-{e:.2f} s") for s, e in f.caller_speech
    ]
    for n, (start, end) in enumerate(f.agent_turns, 1):
        before = [e for s, e in f.caller_speech if e <= start]
        talking = any(s <= start < e for s, e in f.caller_speech)
        if not before:
            how = "before the caller spoke"
        elif talking:
            how = "while the caller was talking"
        else:
            how = f"{(start - max(before)) * 1000:.0f} ms after the caller stopped"
        events.append((start, f"agent turn {n}: {start:.2f}-{end:.2f} s, {how}"))
    events += [(t, f"clear at {t:.2f} s (barge-in)") for t in f.clears]
    events += [(t, f"caller interjected {what} at {t:.2f} s") for t, what in call.interjections]
    events += [(t, f"caller pressed {key} at {t:.2f} s") for t, key in call.keys]
    lines += ["  " + text for _, text in sorted(events)]
    latencies = f.response_latencies
    if latencies:
        lines.append(
            f"  response latency: median {np.median(latencies) * 1000:.0f} ms, "
            f"max {max(latencies) * 1000:.0f} ms over {len(latencies)} turn(s)"
        )
    lines.append(
        f"  barge-ins: {len(f.clears)}; marks: {f.marks_sent} sent, {f.marks_echoed} echoed"
    )
    return "\n".join(lines)


def main_simulate(args: argparse.Namespace, settings: Settings) -> int:
    """The CLI's `simulate` command (argparse namespace in, exit status out)."""
    from ..audio.wavfile import WavError

    wav = Path(args.wav)
    out = Path(args.out) if args.out else wav.with_name(wav.stem + "-heard.wav")
    try:
        realism = _realism(args)
        if args.gemini_standin and args.url:
            raise ValueError("--gemini-standin needs the in-process server: drop --url")
    except ValueError as exc:
        print(f"telephony simulate: {exc}", file=sys.stderr)
        return 2
    standin: list[ConnectionRecord] = []

    async def run() -> SimulatedCall:
        kwargs: dict[str, Any] = dict(
            settle_s=args.settle, max_s=args.max_seconds, progress=sys.stderr, **realism
        )
        if args.url:
            return await simulate_call(
                wav, url=args.url, auth_token=settings.twilio_auth_token, **kwargs
            )
        from ..server.app import create_app

        async with contextlib.AsyncExitStack() as stack:
            if args.gemini_standin:
                from .gemini_live import GeminiLiveService

                service = await stack.enter_async_context(GeminiLiveService())
                # before the app exists: google-genai reads these when ADK builds its client
                os.environ.update(service.environ())
            app = create_app(settings)
            await stack.enter_async_context(app.test_app())
            call = await simulate_call(wav, app=app, **kwargs)
            if args.gemini_standin:
                standin[:] = service.connections
            return call

    try:
        read_wav(wav)
        call = asyncio.run(run())
    except WavError as exc:
        print(f"telephony simulate: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name != "trustme":
            raise
        print(
            "telephony simulate: --gemini-standin needs the test extra: "
            "pip install 'telephony[test]'",
            file=sys.stderr,
        )
        return 2
    except (OSError, WebhookError) as exc:
        print(f"telephony simulate: the call failed: {exc}", file=sys.stderr)
        return 1
    write_wav(out, call.heard)
    print(format_summary(call))
    if args.gemini_standin:
        print(format_standin(standin))
    print(f"what the caller heard: {out}")
    return 0


def format_standin(connections: Sequence[ConnectionRecord]) -> str:
    """What the Gemini stand-in was told, connection by connection."""
    lines = [f"Gemini stand-in: {len(connections)} connection(s)"]
    for n, c in enumerate(connections, 1):
        lines.append(
            f"  {n}: {c.model}, {len(c.text_turns)} text turn(s), {c.audio_s:.1f} s of caller "
            f"audio, {len([t for t in c.context if t.role == 'model'])} answer(s), "
            + ("resumed" if c.resumed_handle else "new session")
            + (f", closed {c.close_code}" if c.close_code else "")
        )
    return "\n".join(lines)


def _realism(args: argparse.Namespace) -> dict[str, Any]:
    """`simulate_call`'s line and caller options from the command line, checked before
    anything is dialled (ValueError if one makes no sense)."""
    if bad := set(args.keys) - set(DIGITS):
        raise ValueError(f"--keys: not phone keys: {''.join(sorted(bad))!r}")
    if args.key_gap_ms < 0:
        raise ValueError("--key-gap-ms cannot be negative")
    interjections = [
        Interjection(name, after)
        for name, after in (("mm-hm", args.backchannel_after), ("cough", args.cough_after))
        if after is not None
    ]
    return dict(
        network=Network(args.delay_ms / 1000, args.jitter_ms / 1000, args.seed),
        echo=None if args.echo_db is None else Echo(args.echo_db, args.echo_delay_ms / 1000),
        interjections=interjections,
        keys=args.keys,
        key_gap_s=args.key_gap_ms / 1000,
    )
