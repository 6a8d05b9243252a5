"""What storing a session event costs the call: the time `append_event` keeps its caller
waiting (ADK's live flow awaits it before the call sees the event), for the server's
write-behind service and ADK's stock `DatabaseSessionService`, on the same database.

CALLS concurrent sessions each append EVENTS events (a transcript line with a state change),
one every GAP_MS, as calls talking at once do; reported: the median, 99th percentile and worst
wait per append, how long the appends took, and how long after the last one every row was
stored.

Run: python bench/sessions.py URL [--calls 40] [--events 50] [--gap-ms 20]
     URL: sqlite+aiosqlite:///FILE or postgresql+asyncpg://USER:PASSWORD@HOST/DB (empty)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from google.adk.events import Event, EventActions  # noqa: E402
from google.adk.sessions import DatabaseSessionService  # noqa: E402
from google.genai import types  # noqa: E402

from telephony.server.sessions import WriteBehindSessionService  # noqa: E402


async def run(
    service: DatabaseSessionService, label: str, calls: int, events: int, gap_s: float
) -> None:
    waits: list[float] = []

    async def call(n: int) -> None:
        session = await service.create_session(
            app_name="bench", user_id=f"+1555{n:07d}", session_id=f"{label}-{n}"
        )
        for i in range(events):
            event = Event(
                author="phone_agent",
                output_transcription=types.Transcription(text=f"line {i}", finished=True),
                actions=EventActions(state_delta={"turns": i}),
            )
            started = time.perf_counter()
            await service.append_event(session, event)
            waits.append(time.perf_counter() - started)
            await asyncio.sleep(gap_s)

    started = time.perf_counter()
    await asyncio.gather(*(call(n) for n in range(calls)))
    appended = time.perf_counter()
    await service.flush()
    stored = time.perf_counter()
    await service.close()
    ms = np.array(waits) * 1000
    print(
        f"{label:13s} append_event wait: median {np.median(ms):7.3f} ms, "
        f"p99 {np.percentile(ms, 99):7.3f} ms, worst {ms.max():7.1f} ms; "
        f"{len(waits)} events appended in {appended - started:.2f} s, all stored "
        f"{(stored - appended) * 1000:.0f} ms after the last"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    args = parser.parse_args()
    gap_s = args.gap_ms / 1000
    await run(WriteBehindSessionService(args.url), "write-behind", args.calls, args.events, gap_s)
    await run(DatabaseSessionService(args.url), "stock", args.calls, args.events, gap_s)


if __name__ == "__main__":
    asyncio.run(main())
