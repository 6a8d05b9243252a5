"""ADK's SQLite session service, with one connection kept open and events written behind.

ADK writes each finished event (a transcript line, a turn's end) to the session service and
waits for the write before it hands the event on to the call. The stock `SqliteSessionService`
opens a connection (and with aiosqlite, a thread) for every operation and makes several round
trips per event through the event loop, all calls queueing on the database one at a time:
measured with `bench/load.py` on 2 cores, turns waited seconds for it from about 40
concurrent calls on, where sessions in memory went through.

Here an event is applied to the session in memory at once and its row queued; one writer task
commits whatever has queued in a single transaction (a group commit: the busier the server, the
bigger the batch, the fewer the round trips). Reading a session waits for the rows queued
before it, so a restarted live session sees its whole history, and `flush()` (which ADK's
`Runner.close` and our shutdown call) returns once everything is on disk. A row that cannot be
written is logged with its session and counted in `write_errors`, and costs no other row.
What a crash of the process can lose is the last few milliseconds of rows; WAL with
`synchronous=NORMAL` means a power cut may lose the last transactions too.

ADK's check for a stale session (another writer changed it since it was read) is not made:
a session belongs to one call, in one process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiosqlite
from google.adk.events import Event
from google.adk.sessions import Session, _session_util
from google.adk.sessions.base_session_service import GetSessionConfig, ListSessionsResponse
from google.adk.sessions.sqlite_session_service import (
    CREATE_SCHEMA_SQL,
    PRAGMA_FOREIGN_KEYS,
    SqliteSessionService,
)

__all__ = ["PersistentSqliteSessionService"]

log = logging.getLogger(__name__)

_INSERT_EVENT = (
    "INSERT INTO events (id, app_name, user_id, session_id, invocation_id, timestamp, "
    "event_data) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_TOUCH_SESSION = (
    "UPDATE sessions SET update_time = MAX(update_time, ?) "
    "WHERE app_name = ? AND user_id = ? AND id = ?"
)


@dataclass(frozen=True, slots=True)
class _Row:
    """An event as it will be stored, serialised when it was appended."""

    app_name: str
    user_id: str
    session_id: str
    event_id: str
    invocation_id: str
    timestamp: float
    data: str
    deltas: dict[str, dict[str, Any]] | None

    def event_values(self) -> tuple[str, str, str, str, str, float, str]:
        """The values of `_INSERT_EVENT`, in its column order."""
        return (
            self.event_id,
            self.app_name,
            self.user_id,
            self.session_id,
            self.invocation_id,
            self.timestamp,
            self.data,
        )


class PersistentSqliteSessionService(SqliteSessionService):
    def __init__(self, db_path: str) -> None:
        super().__init__(db_path)
        self._conn: aiosqlite.Connection | None = None
        self._conn_lock = asyncio.Lock()
        self.connections_opened = 0
        self.batches_committed = 0
        self.write_errors = 0
        self._queued: list[_Row] = []
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._settled.set()
        self._writer: asyncio.Task[None] | None = None

    async def append_event(self, session: Session, event: Event) -> Event:
        if event.partial:
            return event
        self._apply_temp_state(session, event)
        event = self._trim_temp_delta_state(event)
        deltas = event.actions.state_delta if event.actions else None
        self._queued.append(
            _Row(
                session.app_name,
                session.user_id,
                session.id,
                event.id,
                event.invocation_id,
                event.timestamp,
                event.model_dump_json(exclude_none=True),
                _session_util.extract_json_safe_state_delta(deltas) if deltas else None,
            )
        )
        self._settled.clear()
        self._wake.set()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_behind(), name="session-writer")
        session.last_update_time = event.timestamp
        return self._commit_event_to_session(session, event)

    async def flush(self) -> None:
        """Returns once every event appended so far is committed (or reported lost)."""
        await self._settled.wait()

    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str,
        config: GetSessionConfig | None = None,
    ) -> Session | None:
        await self.flush()
        return await super().get_session(
            app_name=app_name, user_id=user_id, session_id=session_id, config=config
        )

    async def list_sessions(
        self, *, app_name: str, user_id: str | None = None
    ) -> ListSessionsResponse:
        await self.flush()
        return await super().list_sessions(app_name=app_name, user_id=user_id)

    async def delete_session(self, *, app_name: str, user_id: str, session_id: str) -> None:
        await self.flush()
        await super().delete_session(app_name=app_name, user_id=user_id, session_id=session_id)

    async def _write_behind(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queued:
                batch, self._queued = self._queued, []
                await self._commit(batch)
            self._settled.set()

    async def _commit(self, batch: list[_Row]) -> None:
        try:
            async with self._get_db_connection() as db:
                await self._write(db, batch)
            self.batches_committed += 1
            return
        except Exception:  # noqa: BLE001 - the writer must outlive any one bad batch
            if len(batch) == 1:
                self.write_errors += 1
                row = batch[0]
                log.exception("session %s: event %s was not saved", row.session_id, row.event_id)
                return
        for row in batch:  # one bad row must not cost the others
            await self._commit([row])

    async def _write(self, db: aiosqlite.Connection, batch: list[_Row]) -> None:
        for row in batch:
            if row.deltas is None:
                continue
            where = (row.app_name, row.user_id)
            if row.deltas["app"]:
                await self._upsert_app_state(db, row.app_name, row.deltas["app"], row.timestamp)
            if row.deltas["user"]:
                await self._upsert_user_state(db, *where, row.deltas["user"], row.timestamp)
            if row.deltas["session"]:
                await self._update_session_state_in_db(
                    db, *where, row.session_id, row.deltas["session"], row.timestamp
                )
        await db.executemany(_INSERT_EVENT, [r.event_values() for r in batch])
        latest: dict[tuple[str, str, str], float] = {}
        for r in batch:
            key = (r.app_name, r.user_id, r.session_id)
            latest[key] = max(latest.get(key, 0.0), r.timestamp)
        await db.executemany(_TOUCH_SESSION, [(t, *key) for key, t in latest.items()])
        await db.commit()

    @asynccontextmanager
    async def _get_db_connection(self) -> AsyncIterator[aiosqlite.Connection]:
        # One operation at a time on the shared connection, as ADK does for ":memory:".
        async with self._conn_lock:
            if self._conn is None:
                conn = aiosqlite.connect(self._db_connect_path, uri=self._db_connect_uri)
                # never keeps the process alive on exit (the thread is the connection in
                # older aiosqlite, an attribute of it in newer ones)
                getattr(conn, "_thread", conn).daemon = True
                await conn
                try:
                    conn.row_factory = aiosqlite.Row
                    await conn.execute("PRAGMA journal_mode = WAL")
                    await conn.execute("PRAGMA synchronous = NORMAL")
                    await conn.execute(PRAGMA_FOREIGN_KEYS)
                    await conn.executescript(CREATE_SCHEMA_SQL)
                except BaseException:
                    await conn.close()
                    raise
                self._conn = conn
                self.connections_opened += 1
            try:
                yield self._conn
            except BaseException:
                await self._conn.rollback()
                raise

    async def close(self) -> None:
        await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.wait({self._writer})
            self._writer = None
        async with self._conn_lock:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None
        await super().close()
