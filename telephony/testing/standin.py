"""What the stand-ins of remote services (Gemini Live, Twilio's REST API) share: served on
loopback from one event loop, reachable from tests on any loop or thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Self, TypeVar

__all__ = ["LoopbackService", "in_thread"]


class LoopbackService:
    """A stand-in's life cycle: `start`/`stop` (or `async with`), and `wait_for`."""

    WAIT_S = 5.0
    """`wait_for`'s default timeout."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def wait_for(self, condition: Callable[[], object], timeout: float | None = None) -> None:
        """Polls rather than awaiting an event, so that callers on any loop can use it."""
        limit = self.WAIT_S if timeout is None else timeout
        deadline = time.monotonic() + limit
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {limit} s")
            await asyncio.sleep(0.01)


S = TypeVar("S", bound=LoopbackService)


@contextmanager
def in_thread(service: S, name: str) -> Iterator[S]:
    """`service` started on its own event loop in a daemon thread, for synchronous callers."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=name, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(service.start(), loop).result(timeout=10)
        yield service
    finally:
        asyncio.run_coroutine_threadsafe(service.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
