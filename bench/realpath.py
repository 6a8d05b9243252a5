"""The production path under load, beside a bare relay: N concurrent simulated calls with real
speech at real-time pace against `telephony serve` (the built-in Gemini agent: ADK ->
google-genai -> TLS) and against `bench/bare_relay.py` (google-genai alone), both talking to
one Gemini Live stand-in (telephony/testing/gemini_live.py, in a process of its own) that
decides turns with its own VAD and answers each utterance by echoing it.

Both servers run for the whole bench; the rounds alternate between them at each N, under the
same load from the same generator (this process), so other work on the machine weighs on both
alike. Each call waits for the greeting, then says a sentence, waits for the answer, listens
to it and says the next, until SECONDS are up. Per round: server CPU per call (share of one
core, from /proc utime+stime over the talking phase), RSS per call (peak over idle),
response latency (last caller frame sent -> first agent audio received), underruns (gaps of
20-300 ms inside an answer the caller heard), echo fidelity (the answer's best normalised
correlation with the sentence said, lowest over all turns), good calls (every turn answered
within MAX_RESPONSE_S, no underrun, fidelity at least ECHO_GOOD, no protocol error), and
beside them the stand-in's and this generator's CPU and the machine's idle share (of all
cores), which show when the machine, not the server, was the limit.

Run: python bench/realpath.py [--calls N ...] [--seconds S] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from telephony.testing.simulator import CallerSimulator, place_call  # noqa: E402
from tests.audio_tools import best_correlation, fixture, speech_core  # noqa: E402
from tests.server import free_port  # noqa: E402

SENTENCES = ("hello", "weather", "stop", "sunday", "time")
MAX_RESPONSE_S = 1.5
ECHO_GOOD = 0.9
"""A good answer correlates this well with what was said (one call alone scores 0.95-0.99)."""
ANSWER_TIMEOUT_S = 6.0
WARM_UP_CALLS, WARM_UP_S = 2, 5.0
"""Each server serves a short round, unmeasured, before the first measured one."""
_SIDS = itertools.count(1)
_LOG_LINES = 5
"""The server's last log lines shown beside a round's errors."""
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def machine_ticks() -> tuple[int, int]:
    """(idle, total) jiffies of all cores (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:8]]
    return ticks[3] + ticks[4], sum(ticks)


class Process:
    """A child process of the bench."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    @classmethod
    def listening(
        cls,
        args: list[str],
        env: dict[str, str],
        port: int,
        cwd: Path = ROOT,
        log: Path | None = None,
    ) -> Process:
        """Started, once it accepts connections on `port`; its stderr goes to `log`."""
        with open(log or os.devnull, "w") as stderr:  # the child keeps its own copy
            self = cls(subprocess.Popen(args, env=env, cwd=cwd, stderr=stderr, text=True))
        ready = _listening(port)
        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{args} exited with {self.proc.returncode}")
            if ready():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"{args} did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _listening(port: int) -> Callable[[], bool]:
    import socket

    def ready() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    return ready


def start_standin() -> tuple[Process, dict[str, str]]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--standin"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    environ = json.loads(proc.stdout.readline())
    return Process(proc), environ


def serve_standin() -> None:
    """The stand-in, alone in this process (`--standin`): prints its environment, serves."""
    from telephony.testing.gemini_live import GeminiLiveService

    async def main() -> None:
        async with GeminiLiveService() as service:
            print(json.dumps(service.environ()), flush=True)
            await asyncio.Future()

    asyncio.run(main())


@dataclass
class Target:
    name: str
    process: Process
    base_url: str
    """`telephony serve`: the webhook's origin (the simulator follows the TwiML)."""
    stream_url: str
    """The bare relay: a WebSocket the simulator opens directly."""
    log: Path | None = None
    """The server's stderr (warnings and errors: the bench runs it at WARNING)."""


def start_product(env: dict[str, str], tmp: str, checkout: Path = ROOT) -> Target:
    """`telephony serve` of `checkout` (this one by default)."""
    port = free_port()
    env = {
        **env,
        "PYTHONPATH": str(checkout),
        "TELEPHONY_LOG_LEVEL": "WARNING",
        # the bench measures the path, not admission: nothing is turned away
        "TELEPHONY_MAX_LOOP_BUSY": "0",
        "TELEPHONY_MAX_LOOP_LAG_MS": "0",
    }
    args = [sys.executable, "-m", "telephony.cli", "serve", "--port", str(port)]
    args += ["--session-db", str(Path(tmp) / f"sessions-{port}.db")]
    log = Path(tmp) / f"telephony-{port}.log"
    process = Process.listening(args, env, port, cwd=checkout, log=log)
    name = "telephony" if checkout == ROOT else checkout.name
    return Target(name, process, f"http://127.0.0.1:{port}", "", log)


def start_bare(env: dict[str, str]) -> Target:
    port = free_port()
    process = Process.listening(
        [sys.executable, str(ROOT / "bench" / "bare_relay.py"), str(port)], env, port
    )
    return Target("bare relay", process, "", f"ws://127.0.0.1:{port}/stream")


@dataclass
class Turn:
    sentence: str
    spoke: float
    answered: float | None


@dataclass
class CallResult:
    turns: list[Turn] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sim: CallerSimulator | None = None


@asynccontextmanager
async def _open(target: Target, sid: str) -> AsyncIterator[CallerSimulator]:
    if target.base_url:
        async with place_call(target.base_url, call_sid=sid) as sim:
            yield sim
        return
    async with connect(target.stream_url, compression=None) as ws:
        sim = CallerSimulator(ws, call_sid=sid, parameters={})
        await sim.begin()
        try:
            yield sim
        finally:
            await sim.close()


async def one_call(
    target: Target, n: int, talking: asyncio.Event, greeted: Callable[[], None], end: list[float]
) -> CallResult:
    result = CallResult()
    loop = asyncio.get_running_loop()
    try:
        # a call SID names one call for good: rounds must not reuse them
        async with _open(target, f"CA{next(_SIDS):032x}") as sim:
            result.sim = sim
            if await sim.agent_audio_after(0.0, ANSWER_TIMEOUT_S) is None:
                result.errors.append("no greeting")
            await sim.agent_quiet(0.6)
            greeted()
            await talking.wait()
            await asyncio.sleep((n * 0.37) % 1.5)  # calls out of step, as real ones are
            turn = 0
            while loop.time() < end[0]:
                sentence = SENTENCES[(n + turn) % len(SENTENCES)]
                await sim.say(fixture(sentence))
                await sim.finish_speaking()
                spoke = loop.time()
                answer = await sim.agent_audio_after(spoke, ANSWER_TIMEOUT_S)
                result.turns.append(Turn(sentence, spoke, answer and answer.received))
                if answer is not None:
                    await sim.agent_quiet(0.5)
                turn += 1
            result.errors += sim.log.protocol_errors
            await sim.hang_up()
    except Exception as exc:  # noqa: BLE001 - a failed call is a figure, not a crash
        result.errors.append(repr(exc))
        greeted()
    return result


def _underruns(sim: CallerSimulator) -> int:
    pieces = sorted((h.start, h.end) for h in sim.log.heard if h.audio)
    return sum(
        0.02 < b_start - a_end < 0.3
        for (_, a_end), (b_start, _) in zip(pieces, pieces[1:], strict=False)
    )


def _echo_scores(result: CallResult) -> list[float]:
    assert result.sim is not None
    log = result.sim.log
    heard = log.heard_pcm()
    scores = []
    for turn in result.turns:
        if turn.answered is None:
            continue
        at = int((turn.spoke - log.started) * 8000)
        core = speech_core(turn.sentence)
        window = heard[at : at + len(core) + 3 * 8000]
        scores.append(best_correlation(window, core)[0])
    return scores


async def run_round(target: Target, calls: int, seconds: float, stand_in: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=min(calls, 64)))
    pid = target.process.pid
    idle_rss = rss_mb(pid)
    log_at = target.log.stat().st_size if target.log else 0  # this round's lines only
    talking = asyncio.Event()
    left = [calls]
    end = [float("inf")]

    def greeted() -> None:
        left[0] -= 1
        if not left[0]:
            talking.set()

    tasks = []
    for n in range(calls):  # Twilio brings calls in one by one
        tasks.append(asyncio.create_task(one_call(target, n, talking, greeted, end)))
        await asyncio.sleep(0.1)
    await talking.wait()
    end[0] = loop.time() + seconds
    t0 = time.monotonic()
    own0, server0, standin0 = _own_cpu(), cpu_s(pid), cpu_s(stand_in)
    idle0, total0 = machine_ticks()
    peak = idle_rss
    while loop.time() < end[0]:
        await asyncio.sleep(0.5)
        peak = max(peak, rss_mb(pid))
    wall = time.monotonic() - t0
    server = cpu_s(pid) - server0
    standin = cpu_s(stand_in) - standin0
    own = _own_cpu() - own0
    idle1, total1 = machine_ticks()
    results = await asyncio.gather(*tasks)
    latencies, scores, underruns, good, unanswered = [], [], 0, 0, 0
    errors = []
    for result in results:
        call_scores = _echo_scores(result) if result.sim else []
        call_lat = [t.answered - t.spoke for t in result.turns if t.answered is not None]
        missed = sum(t.answered is None for t in result.turns)
        runs = _underruns(result.sim) if result.sim else 0
        latencies += call_lat
        scores += call_scores
        underruns += runs
        unanswered += missed
        errors += result.errors
        good += (
            not result.errors
            and bool(result.turns)
            and not missed
            and not runs
            and max(call_lat) < MAX_RESPONSE_S
            and min(call_scores) >= ECHO_GOOD
        )
    for error in errors[:2]:
        print(f"      {target.name}: {error}", flush=True)
    if errors and target.log:
        with target.log.open() as log:
            log.seek(log_at)
            lines = log.read().splitlines()
        for line in lines[-_LOG_LINES:]:
            print(f"      {target.name} log: {line[:200]}", flush=True)
    lat = np.array(latencies or [np.nan]) * 1000
    return {
        "server_cpu_per_call": server / wall / calls * 100,
        "server_cpu": server / wall * 100,
        "rss_per_call": (peak - idle_rss) / calls,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "turns": len(latencies) + unanswered,
        "unanswered": unanswered,
        "underruns": underruns,
        "echo_min": min(scores, default=0.0),
        "echo_median": float(np.median(scores)) if scores else 0.0,
        "good": good,
        "calls": calls,
        "standin_cpu": standin / wall * 100,
        "generator_cpu": own / wall * 100,
        "idle": (idle1 - idle0) / max(1, total1 - total0) * 100,
    }


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


ROW = (
    "{calls:5d}  {name:10s}  {server_cpu_per_call:6.2f}% ({server_cpu:3.0f}%)  {rss_per_call:6.2f}"
    "  {p50:6.0f} /{p99:6.0f}  {underruns:6d}  {echo_min:4.2f} / {echo_median:4.2f}"
    "  {good:3d}/{calls:<3d} {unanswered:4d}/{turns:<4d}  {standin_cpu:5.0f}%"
    "  {generator_cpu:5.0f}%  {idle:4.0f}%"
)
HEADER = (
    "    N  server      CPU/call (all)  RSS/call MB  response p50/p99 ms  underruns"
    "  echo min/median  good  unanswered  stand-in  generator  idle"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", nargs="+", type=int, default=[10, 20, 30])
    parser.add_argument("--seconds", type=float, default=20.0, help="talking phase per round")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per server at each N")
    parser.add_argument("--only", choices=("telephony", "bare"), help="load one server only")
    parser.add_argument(
        "--against",
        type=Path,
        metavar="CHECKOUT",
        help="also load the telephony serve of another checkout (before/after, interleaved)",
    )
    parser.add_argument("--standin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.standin:
        serve_standin()
        return
    standin, environ = start_standin()
    env = {**os.environ, **environ}
    targets: list[Target] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.only != "telephony":
                targets.append(start_bare(env))
            if args.only != "bare" and args.against:
                targets.append(start_product(env, tmp, args.against.resolve()))
            if args.only != "bare":
                targets.append(start_product(env, tmp))
            print(
                f"{os.cpu_count()} cores; each round: N calls greeted, then {args.seconds:.0f} s "
                f"of talking measured; CPU in % of one core (idle: % of all cores); good = every "
                f"turn answered within {MAX_RESPONSE_S} s, no underrun, echo >= {ECHO_GOOD}"
            )
            for target in targets:  # imports, first connections, caches: not a call's cost
                asyncio.run(run_round(target, WARM_UP_CALLS, WARM_UP_S, standin.pid))
            print(HEADER, flush=True)
            summary: dict[tuple[str, int], list[dict[str, float]]] = {}
            for calls in args.calls:
                for _ in range(args.rounds):
                    for target in targets:
                        r = asyncio.run(run_round(target, calls, args.seconds, standin.pid))
                        summary.setdefault((target.name, calls), []).append(r)
                        print(ROW.format(name=target.name, **r), flush=True)
            _print_summary(summary, targets, args.calls)
        finally:
            for target in targets:
                target.process.stop()
            standin.stop()


def _print_summary(
    summary: dict[tuple[str, int], list[dict[str, float]]], targets: list[Target], calls: list[int]
) -> None:
    print("\nside by side (mean over rounds): CPU per call, and good calls")
    print(
        "    N  " + "  ".join(f"{t.name:>22s}" for t in targets) + ("  ratio" * (len(targets) > 1))
    )
    for n in calls:
        cells, costs = [], []
        for target in targets:
            rounds = summary[(target.name, n)]
            cost = float(np.mean([r["server_cpu_per_call"] for r in rounds]))
            good = min(r["good"] for r in rounds)
            costs.append(cost)
            cells.append(f"{cost:6.2f}%  {good:3d}/{n:<3d} good")
        ratio = f"  {costs[-1] / costs[0]:.2f}x" if len(costs) > 1 else ""
        print(f"{n:5d}  " + "  ".join(f"{c:>22s}" for c in cells) + ratio)
    for target in targets:
        ok = [n for n in calls if all(r["good"] == n for r in summary[(target.name, n)])]
        print(f"{target.name}: highest N with every call good: {max(ok, default=0)}")


if __name__ == "__main__":
    main()
