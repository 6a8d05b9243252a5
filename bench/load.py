"""Load: N concurrent simulated calls with real speech, at real-time pace, against
`telephony serve echo` in its own process; then many short calls to look for leaks.

Calls arrive at --rate per second, or, with --within W, all N within W seconds (a burst:
Twilio posts the webhooks as fast as the calls come in). Each admitted caller says a sentence,
waits for the echo to finish, and says the next, for SECONDS; a sentence left unanswered is
counted, and the caller goes on to the next. Reported per N: calls admitted, calls refused
(turned away with the busy message), good calls (every sentence answered, no protocol error,
clean hang-up), unanswered sentences, response latency of the admitted calls (last caller
frame sent -> first agent audio received), underruns (agent audio arriving more than
UNDERRUN_S after the audio before it ran out: silence the caller hears mid-reply; this includes
the load generator's own delays) and the worst such lateness, lateness as the server sent the
audio (its /metrics histogram, as a bucket bound), server CPU (share of one core) and RSS per
call, the load generator's own CPU, and the CPU other processes on the machine used meanwhile
(figures taken beside them are noisy).

Run: python bench/load.py [N ...] [--seconds S] [--rate R | --within W] [--instances K]
                          [--leak-calls M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from telephony.call.playback import UNDERRUN_S  # noqa: E402
from telephony.testing.simulator import CallerSimulator, WebhookError, place_call  # noqa: E402
from telephony.twilio.twiml import BUSY_MESSAGE  # noqa: E402
from tests.audio_tools import fixture  # noqa: E402
from tests.server import free_port  # noqa: E402

SPEECH = [fixture(name) for name in ("hello", "weather", "stop", "bonjour")]
TURN_GAP_S = 1.0
"""Agent audio arriving this long after the previous piece ended starts a new turn."""


@dataclass
class Results:
    admitted: int = 0
    completed: int = 0
    refused: int = 0
    unanswered: int = 0
    failed: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)


class Server:
    """`telephony serve echo` in a child process, with its CPU and memory read from /proc."""

    def __init__(self, session_db: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "telephony.cli", "serve", "echo", "--port", str(self.port)]
            + ["--session-db", session_db],
            env={**os.environ, "TELEPHONY_LOG_LEVEL": "WARNING"},
            cwd=ROOT,  # this checkout's telephony, wherever the bench is run from
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(300):
            try:
                self.health()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the server did not start")

    def health(self) -> dict[str, object]:
        with urllib.request.urlopen(self.url + "/healthz", timeout=5) as response:
            return json.loads(response.read())

    def gap_buckets(self) -> list[tuple[float, int]]:
        """The server's /metrics histogram of how late each agent audio message left after
        the audio before it ran out: (bound in seconds, messages at most that late)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        return [
            (float(s.labels["le"]), int(s.value))
            for family in text_string_to_metric_families(text)
            if family.name == "telephony_agent_audio_gap_seconds"
            for s in family.samples
            if s.name.endswith("_bucket")
        ]

    def cpu_s(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Fleet:
    """K instances side by side, as behind a load balancer: call n's webhook goes to instance
    n mod K, whose TwiML sends the media stream back to it."""

    def __init__(self, instances: int, tmp: Path, session_db: str | None) -> None:
        self.servers: list[Server] = []
        tmp = Path(tempfile.mkdtemp(dir=tmp))  # fresh databases: the call SIDs repeat
        try:
            for i in range(instances):
                db = str(tmp / f"sessions-{i}.db") if session_db is None else session_db
                self.servers.append(Server(db))
        except BaseException:
            self.stop()
            raise

    def url(self, n: int) -> str:
        return self.servers[n % len(self.servers)].url

    def cpu_s(self) -> float:
        return sum(s.cpu_s() for s in self.servers)

    def rss_mb(self) -> float:
        return sum(s.rss_mb() for s in self.servers)

    def health(self) -> tuple[int, int]:
        """Tasks and active calls, over all instances."""
        states = [s.health() for s in self.servers]
        return sum(h["tasks"] for h in states), sum(h["active_calls"] for h in states)

    def gap_quantile_ms(self, q: float) -> float:
        """The bucket bound under which a fraction q of all agent audio messages left."""
        merged: dict[float, int] = {}
        for server in self.servers:
            for bound, seen in server.gap_buckets():
                merged[bound] = merged.get(bound, 0) + seen
        buckets = sorted(merged.items())
        total = buckets[-1][1]
        return next(b for b, seen in buckets if seen >= q * total) * 1000

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def machine_cpu_s() -> float:
    """CPU time all processes on the machine have used (/proc/stat), to tell how much other
    work shared the cores with the run."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _lateness(sim: CallerSimulator) -> list[float]:
    """Per media message continuing a turn: arrival minus when the audio before it ran out."""
    out = []
    pieces = sorted(sim.log.heard, key=lambda h: h.received)
    for before, piece in zip(pieces, pieces[1:], strict=False):
        if piece.received - before.end < TURN_GAP_S:
            out.append(piece.received - before.end)
    return out


async def one_call(url: str, n: int, at: float, seconds: float, results: Results) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(at)
    try:
        async with place_call(url, call_sid=f"CA{n:032x}") as sim:
            results.admitted += 1
            await asyncio.sleep(1.0)
            end = loop.time() + seconds
            turn = unanswered = 0
            while loop.time() < end:
                await sim.say(SPEECH[(n + turn) % len(SPEECH)])
                await sim.finish_speaking()
                spoke = loop.time()
                answer = await sim.agent_audio_after(spoke, timeout=10.0)
                if answer is None:
                    unanswered += 1
                else:
                    results.latencies.append(answer.received - spoke)
                    await sim.agent_quiet(0.5)
                turn += 1
            results.lateness += _lateness(sim)
            results.unanswered += unanswered
            if unanswered:
                results.failed.append(f"call {n}: {unanswered} of {turn} turns never answered")
                return
            if sim.log.protocol_errors:
                results.failed.append(f"call {n}: {sim.log.protocol_errors[0]}")
                return
            await sim.hang_up()
        results.completed += 1
    except WebhookError as exc:
        if BUSY_MESSAGE not in str(exc):
            raise
        results.refused += 1  # turned away politely: the server was at capacity
    except Exception as exc:  # noqa: BLE001 - a failed call is a figure, not a crash
        results.failed.append(f"call {n}: {exc!r}")


async def concurrent(fleet: Fleet, calls: int, seconds: float, rate: float) -> dict[str, float]:
    # Twilio posts every webhook as its call comes in: none waits for a worker thread.
    workers = ThreadPoolExecutor(max_workers=min(calls, 256))
    asyncio.get_running_loop().set_default_executor(workers)
    results = Results()
    idle_rss = fleet.rss_mb()
    cpu0, own0, all0, t0 = fleet.cpu_s(), own_cpu_s(), machine_cpu_s(), time.monotonic()
    peak_rss = idle_rss

    async def sample() -> None:
        nonlocal peak_rss
        while True:
            await asyncio.sleep(1.0)
            peak_rss = max(peak_rss, fleet.rss_mb())

    sampler = asyncio.create_task(sample())
    await asyncio.gather(
        *(one_call(fleet.url(n), n, n / rate, seconds, results) for n in range(calls))
    )
    sampler.cancel()
    wall = time.monotonic() - t0
    late = np.maximum(np.array(results.lateness or [0.0]), 0) * 1000
    underruns = int((late > UNDERRUN_S * 1000).sum())
    lat = np.array(results.latencies or [np.nan]) * 1000
    for problem in results.failed[:3]:
        print(f"    {problem}")
    return {
        "gap_p99": fleet.gap_quantile_ms(0.99),
        "calls": calls,
        "admitted": results.admitted,
        "completed": results.completed,
        "refused": results.refused,
        "unanswered": results.unanswered,
        "underruns": underruns,
        "latency_p50": float(np.percentile(lat, 50)),
        "latency_p99": float(np.percentile(lat, 99)),
        "late_max": float(late.max()),
        "server_cpu_per_call": (fleet.cpu_s() - cpu0) / wall / max(1, results.admitted) * 100,
        "server_cpu": (fleet.cpu_s() - cpu0) / wall * 100,
        "client_cpu": (own_cpu_s() - own0) / wall * 100,
        "other_cpu": (machine_cpu_s() - all0 - (fleet.cpu_s() - cpu0) - (own_cpu_s() - own0))
        / wall
        * 100,
        "rss_per_call": (peak_rss - idle_rss) / max(1, results.admitted),
    }


async def leak_check(fleet: Fleet, calls: int, wave: int) -> None:
    """Short calls (greeting, one sentence, hang-up), `wave` at a time."""

    refused = 0

    async def short(n: int) -> None:
        nonlocal refused
        try:
            async with place_call(fleet.url(n), call_sid=f"CB{n:032x}") as sim:
                await asyncio.sleep(0.6)
                await sim.hang_up()
        except WebhookError:
            refused += 1

    for start in range(0, calls, wave):
        await asyncio.gather(*(short(n) for n in range(start, min(calls, start + wave))))
        if start + wave in (100, calls) or (start + wave) % 500 == 0:  # the trend
            await asyncio.sleep(1.0)
            state = (fleet.rss_mb(), *fleet.health())
            print(
                f"  after {start + wave:5d} calls: server RSS {state[0]:6.1f} MB, "
                f"{state[1]} tasks, {state[2]} active calls ({refused} refused)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("calls", nargs="*", type=int, default=[50, 100, 200])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=5.0, help="new calls per second")
    parser.add_argument(
        "--within",
        type=float,
        help="a burst: the N calls arrive evenly within this many seconds (instead of --rate)",
    )
    parser.add_argument(
        "--session-db",
        help="the servers' session database (default: a fresh SQLite file per instance; "
        "'' keeps sessions in memory)",
    )
    parser.add_argument(
        "--instances", type=int, default=1, help="server processes, calls spread over them"
    )
    parser.add_argument("--leak-calls", type=int, default=1000)
    parser.add_argument("--wave", type=int, default=10)
    args = parser.parse_args()
    arrivals = f"all N within {args.within:g} s" if args.within else f"calls arrive {args.rate:g}/s"
    print(
        f"{os.cpu_count()} cores, {args.instances} instance(s); {arrivals}, each admitted caller "
        f"talks for {args.seconds:.0f} s; refused = turned away with the busy message; good = "
        f"every turn answered; underruns = agent audio > {UNDERRUN_S * 1000:.0f} ms late"
    )
    print(
        "    N  admitted refused  good  unanswered  response p50/p99 ms  underruns  late max ms"
        "  server gap p99 ms  server CPU (per call)  client CPU  other CPU  RSS/call MB"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for calls in args.calls:
            rate = calls / args.within if args.within else args.rate
            fleet = Fleet(args.instances, Path(tmp), args.session_db)
            try:
                r = asyncio.run(concurrent(fleet, calls, args.seconds, rate))
            finally:
                fleet.stop()
            print(
                f"{calls:5d}  {r['admitted']:8d} {r['refused']:7d}  {r['completed']:4d}"
                f"  {r['unanswered']:10d}  {r['latency_p50']:10.0f} /{r['latency_p99']:6.0f}"
                f"  {r['underruns']:9d}  {r['late_max']:11.0f}"
                f"  {'<=':>10s} {r['gap_p99']:5g}"
                f"  {r['server_cpu']:11.0f}% ({r['server_cpu_per_call']:.2f}%)"
                f"  {r['client_cpu']:9.0f}%  {r['other_cpu']:8.0f}%  {r['rss_per_call']:11.2f}",
                flush=True,
            )
        if args.leak_calls:
            print(f"leak check: {args.leak_calls} short calls, {args.wave} at a time")
            fleet = Fleet(args.instances, Path(tmp), None)
            try:
                asyncio.run(leak_check(fleet, args.leak_calls, args.wave))
            finally:
                fleet.stop()


if __name__ == "__main__":
    main()
