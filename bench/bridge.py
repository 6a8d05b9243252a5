"""Latency added inside the bridge, over 50 concurrent simulated calls in one event loop:
Twilio frame in -> caller PCM queued for the model, and model audio event -> `media` written.
Run: python bench/bridge.py [CALLS] [SECONDS]"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from google.adk.agents.live_request_queue import LiveRequestQueue  # noqa: E402
from google.adk.events import Event  # noqa: E402
from google.genai import types  # noqa: E402

from telephony.agents import phone_run_config, warm_up  # noqa: E402
from telephony.call import Call, CallInfo, CallOptions, Outcome  # noqa: E402
from telephony.settings import Settings  # noqa: E402
from telephony.twilio.media_stream import Media, Start  # noqa: E402
from tests.audio_tools import line_noise  # noqa: E402


class ScriptedRunner:
    """Stands in for ADK's Runner: yields the model events the benchmark injects.

    `delivered` stamps each event as run_live hands it to the bridge: the scheduling hop
    between `inject` and that moment belongs to the runner, not to the bridge."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.delivered: list[float] = []

    def inject(self, event: Event) -> None:
        self.events.put_nowait(event)

    async def run_live(
        self, live_request_queue: LiveRequestQueue, **_: object
    ) -> AsyncIterator[Event]:
        reader = asyncio.create_task(self._read(live_request_queue))  # as a model reads audio
        try:
            while True:
                event = await self.events.get()
                self.delivered.append(time.perf_counter())
                yield event
        finally:
            reader.cancel()

    async def _read(self, queue: LiveRequestQueue) -> None:
        while not (await queue.get()).close:
            pass


async def one_call(n: int, seconds: float, frame_lat: list[float], out_lat: list[float]) -> None:
    runner = ScriptedRunner()
    call = Call(
        CallInfo(f"CA{n:032d}", "+1555", "+1666"),
        runner=runner,  # type: ignore[arg-type]
        run_config=None,  # type: ignore[arg-type]
        options=CallOptions(playback_lead_ms=10_000),
    )
    sent_at: list[float] = []

    async def send(text: str) -> None:
        if text.startswith('{"event":"media"'):
            sent_at.append(time.perf_counter())

    put = call.live_queue.send_realtime

    def timed_put(blob: types.Blob) -> None:
        put(blob)
        frame_lat.append(time.perf_counter() - frame_start[0])

    call.live_queue.send_realtime = timed_put  # type: ignore[method-assign]
    frame_start = [0.0]
    call.start()
    call.attach(Start(1, f"MZ{n}", "AC", call.info.call_sid, ("inbound",), {}), send)
    # quiet caller: speech would (rightly) barge in and drop the agent audio being measured
    quiet = line_noise(1, "line", rms=100)
    agent_chunk = (np.sin(np.arange(960) / 5) * 8000).astype("<i2").tobytes()  # 40 ms, 24 kHz
    audio_event = Event(
        author="agent",
        content=types.Content(
            role="model",
            parts=[
                types.Part(
                    inline_data=types.Blob(data=agent_chunk, mime_type="audio/pcm;rate=24000")
                )
            ],
        ),
    )
    await asyncio.sleep(n * 0.02 / 50)
    start = time.perf_counter()
    tick = 0
    while time.perf_counter() - start < seconds:
        payload = quiet[(tick % 50) * 160 :][:160]
        frame_start[0] = time.perf_counter()
        await call.handle(Media(tick, f"MZ{n}", "inbound", tick, tick * 20, payload))
        if tick % 2 == 0:
            runner.inject(audio_event)
        tick += 1
        await asyncio.sleep(max(0.0, start + tick * 0.02 - time.perf_counter()))
    await asyncio.sleep(0.1)
    await call.close("benchmark over", Outcome.SHUTDOWN)
    assert len(sent_at) == len(runner.delivered), (len(sent_at), len(runner.delivered))
    out_lat.extend(s - i for s, i in zip(sent_at, runner.delivered, strict=True))


async def main(calls: int, seconds: float) -> None:
    await warm_up(phone_run_config(Settings.from_env({})))  # as the server does before serving
    frame_lat: list[float] = []
    out_lat: list[float] = []
    await asyncio.gather(*(one_call(n, seconds, frame_lat, out_lat) for n in range(calls)))
    for name, values in (
        ("frame in -> PCM queued", frame_lat),
        ("model audio -> media written", out_lat),
    ):
        ms = np.array(values) * 1000
        print(
            f"{name:30s} n={len(ms):6d}  p50 {np.percentile(ms, 50):.3f} ms  "
            f"p99 {np.percentile(ms, 99):.3f} ms  max {ms.max():.3f} ms"
        )


if __name__ == "__main__":
    asyncio.run(
        main(
            int(sys.argv[1]) if len(sys.argv) > 1 else 50,
            float(sys.argv[2]) if len(sys.argv) > 2 else 5.0,
        )
    )
