"""ADK's `DatabaseSessionService` (SQLite or PostgreSQL), with events written behind.

ADK writes each finished event (a transcript line, a turn's end) to the session service and
waits for the write before it hands the event on to the call. The stock services make a
transaction of several round trips per event, every call queueing on the database: measured
with `bench/load.py` on 2 cores, turns waited seconds for ADK's SQLite service from about 40
concurrent calls on, where sessions in memory went through; `bench/sessions.py` has 40 calls
appending wait a median 0.1-0.6 s per event on the stock `DatabaseSessionService` (SQLite or
PostgreSQL), and 0.03-0.05 ms here.

Here an event is applied to the session in memory at once and its row queued; one writer task
commits whatever has queued within `GATHER_S` in a single transaction (a group commit: the
busier the server, the bigger the batch, the fewer the round trips). Reading a session waits
for the rows queued before it, so a restarted live session sees its whole history, and
`flush()` (which ADK's `Runner.close` and our shutdown call) returns once everything is stored.
A row that cannot be written is logged with its session and counted in `write_errors`, and
costs no other row. What a crash of the process can lose is the rows gathering and in flight,
a quarter of a second's worth (with SQLite, WAL with `synchronous=NORMAL` means a power cut
may lose the last transactions too).

Rows are ADK's own (its schema classes, the current "v1" schema), so ADK's service (`adk web
--session_service_uri` with the driver in the URL) and any other instance read them. ADK's
check for a stale session (another writer changed it since it was read) is not made, so a
call's own queued writes can never trip it: a session belongs to one call, in one process.
Sessions of the same caller on other instances are other rows; the caller's shared (`user:`)
state row is locked while a batch changes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from google.adk.events import Event
from google.adk.sessions import BaseSessionService, DatabaseSessionService, Session, State
from google.adk.sessions.base_session_service import GetSessionConfig, ListSessionsResponse
from google.adk.sessions.schemas.shared import timestamp_to_utc_datetime
from google.adk.sessions.schemas.v1 import (
    StorageAppState,
    StorageEvent,
    StorageMetadata,
    StorageSession,
    StorageUserState,
)
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import inspect, select, text, tuple_
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["SessionStoreError", "WriteBehindSessionService"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
"""The ADK schema the writer's rows follow (`adk_internal_metadata.schema_version`)."""

PREPARE_ATTEMPTS = 5
"""Tries at creating ADK's tables, for instances starting together on a new database."""
MAX_BATCH = 500
"""Rows per transaction at most: a backlog (after the database stalled) is committed in
pieces, each of which builds its ORM rows on the event loop for a few tens of ms at most."""
RETRY_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
"""Waits before a batch that failed with the database out of reach is tried again (30 s in
all); then its rows are tried one at a time, and those that fail are lost and counted."""
GATHER_S = 0.25
"""The writer lets rows gather this long before it commits them, unless a read or a close
waits for them: committed as they came, a transaction per event or two cost the server as
much CPU as its ADK live flow (its own SQL, and SQLite's or the driver's work beside it)."""
READ_WAIT_S = 2.0
"""How long a read waits for the rows queued before it; past that (the database is out of
reach), it reads what is stored, so a new call starts without waiting on the outage."""
_Key = tuple[str, str, str]
"""app_name, user_id, session id."""


class SessionStoreError(RuntimeError):
    """The database cannot be used as it is (an older ADK schema)."""


@dataclass(slots=True)
class _Row:
    """An event as it will be stored, made into ADK's row when it was appended."""

    key: _Key
    timestamp: float
    event: StorageEvent
    app: dict[str, Any] = field(default_factory=dict)
    user: dict[str, Any] = field(default_factory=dict)
    session: dict[str, Any] = field(default_factory=dict)


def _row(session: Session, event: Event) -> _Row:
    """Splits the event's state delta by scope as ADK stores it (the event's JSON form, so
    every value is one the database takes)."""
    stored = StorageEvent.from_event(session, event)
    row = _Row((session.app_name, session.user_id, session.id), event.timestamp, stored)
    delta = (stored.event_data or {}).get("actions", {}).get("state_delta") or {}
    for key, value in delta.items():
        if key.startswith(State.APP_PREFIX):
            row.app[key.removeprefix(State.APP_PREFIX)] = value
        elif key.startswith(State.USER_PREFIX):
            row.user[key.removeprefix(State.USER_PREFIX)] = value
        elif not key.startswith(State.TEMP_PREFIX):
            row.session[key] = value
    return row


class WriteBehindSessionService(DatabaseSessionService):
    """`db_url`: an SQLAlchemy URL with an asyncio driver (`sqlite+aiosqlite:///file`,
    `postgresql+asyncpg://user:password@host/db`)."""

    def __init__(self, db_url: str) -> None:
        super().__init__(db_url)
        self.connections_opened = 0
        self.batches_committed = 0
        self.write_errors = 0
        self._queued: list[_Row] = []
        self._wake = asyncio.Event()
        self._appended = 0
        self._stored = 0
        """Rows queued so far, and rows the writer is done with (committed or lost)."""
        self._progress = asyncio.Event()
        """Set (and replaced) each time the writer is done with a batch."""
        self._hurry = asyncio.Event()
        """Set while a read or a close waits for the rows: they go without gathering more."""
        self._writer: asyncio.Task[None] | None = None
        self._schema_checked = False
        self._closing = asyncio.Event()
        """Set by `close`: rows the database cannot take now are not waited for."""
        sqlalchemy_event.listen(self.db_engine.sync_engine, "connect", self._connected)

    def _connected(self, dbapi_connection: Any, _record: object) -> None:
        self.connections_opened += 1
        if self.db_engine.dialect.name == "sqlite":
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.close()

    async def prepare_tables(self) -> None:
        """ADK's, then a check that the database has the schema the writer writes; tried
        again when it fails for the moment: instances starting together on a new database
        race to create the same tables (the losers' DDL or metadata row fails, or ADK finds
        the metadata table before its row is in: a ValueError), and SQLite is locked by
        another's DDL."""
        if self._schema_checked:
            return
        for attempt in range(PREPARE_ATTEMPTS):
            try:
                await super().prepare_tables()
                version = await self._schema_version()
                break
            except (DBAPIError, ValueError):
                if attempt == PREPARE_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)
        if version != SCHEMA_VERSION:
            raise SessionStoreError(
                f"the session database has ADK's schema {version or '0 (pickled events)'}; "
                f"this server writes schema {SCHEMA_VERSION}: migrate it with "
                "`adk migrate session`, or use a new database"
            )
        self._schema_checked = True

    async def _schema_version(self) -> str | None:
        """What `adk_internal_metadata` says; None without it (ADK's schema 0)."""
        async with self.db_engine.connect() as conn:
            table = StorageMetadata.__tablename__
            if not await conn.run_sync(lambda sync: inspect(sync).has_table(table)):
                return None
            return await conn.scalar(
                select(StorageMetadata.value).where(StorageMetadata.key == "schema_version")
            )

    async def append_event(self, session: Session, event: Event) -> Event:
        if event.partial:
            return event
        # ADK's in-memory append (temp state applied, then trimmed from the event)
        event = await BaseSessionService.append_event(self, session, event)
        try:
            row = _row(session, event)
        except Exception:  # noqa: BLE001 - one event that cannot be stored is its own loss
            self.write_errors += 1
            log.exception("session %s: event %s was not saved", session.id, event.id)
            return event
        self._queued.append(row)
        self._appended += 1
        self._wake.set()
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_behind(), name="session-writer")
        session.last_update_time = event.timestamp
        return event

    async def flush(self) -> None:
        """Returns once every event appended so far is committed (or reported lost); rows
        appended meanwhile do not hold it up, so a read never waits on a busy server's
        later writes."""
        target = self._appended
        while self._stored < target:
            self._hurry.set()
            await self._progress.wait()

    async def _flushed_for_read(self) -> None:
        """`flush`, for at most `READ_WAIT_S`."""
        try:
            async with asyncio.timeout(READ_WAIT_S):
                await self.flush()
        except TimeoutError:
            log.warning(
                "session store: %d row(s) still unwritten after %.0f s; reading without them",
                self._appended - self._stored,
                READ_WAIT_S,
            )

    async def get_session(
        self,
        *,
        app_name: str,
        user_id: str,
        session_id: str,
        config: GetSessionConfig | None = None,
    ) -> Session | None:
        await self._flushed_for_read()
        return await super().get_session(
            app_name=app_name, user_id=user_id, session_id=session_id, config=config
        )

    async def list_sessions(
        self, *, app_name: str, user_id: str | None = None
    ) -> ListSessionsResponse:
        await self._flushed_for_read()
        return await super().list_sessions(app_name=app_name, user_id=user_id)

    async def get_user_state(self, *, app_name: str, user_id: str) -> dict[str, Any]:
        await self._flushed_for_read()
        return await super().get_user_state(app_name=app_name, user_id=user_id)

    async def delete_session(self, *, app_name: str, user_id: str, session_id: str) -> None:
        await self.flush()
        await super().delete_session(app_name=app_name, user_id=user_id, session_id=session_id)

    async def _write_behind(self) -> None:
        while True:
            await self._wake.wait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(GATHER_S):
                    await self._hurry.wait()
            self._wake.clear()  # the rows appended while gathering go now, not a cycle later
            while self._queued:
                batch, self._queued = self._queued[:MAX_BATCH], self._queued[MAX_BATCH:]
                await self._commit_or_retry(batch)
                self._stored += len(batch)
                self._progress.set()
                self._progress = asyncio.Event()
            if not self._closing.is_set():
                self._hurry.clear()

    async def _commit_or_retry(self, batch: list[_Row]) -> None:
        """A batch the database could not take for the moment (out of reach, locked) waits and
        is tried again whole, rather than row by row against a database that is down."""
        for wait in RETRY_S:
            if self._closing.is_set():
                break
            try:
                await self._transaction(batch)
                return
            except Exception as exc:  # noqa: BLE001 - a bad row is found below, one at a time
                if not _out_of_reach(exc):
                    break
                log.warning(
                    "session store: %d row(s) not written (%r); trying again in %.1f s",
                    len(batch),
                    exc,
                    wait,
                )
                with contextlib.suppress(TimeoutError):  # a close cuts the wait short
                    await asyncio.wait_for(self._closing.wait(), wait)
        await self._commit(batch)

    async def _transaction(self, batch: list[_Row]) -> None:
        await self.prepare_tables()
        async with self.database_session_factory() as db, db.begin():
            if self.db_engine.dialect.name == "sqlite":
                # no row locks: the database's write lock, before the rows are read
                await db.execute(text("BEGIN IMMEDIATE"))
            await _write(db, batch)
        self.batches_committed += 1

    async def _commit(self, batch: list[_Row]) -> None:
        try:
            await self._transaction(batch)
            return
        except Exception as exc:  # noqa: BLE001 - the writer must outlive any one bad batch
            if self._closing.is_set() and _out_of_reach(exc):  # not row by row on the way out
                self.write_errors += len(batch)
                log.error("session store out of reach at shutdown: %d row(s) lost", len(batch))
                return
            if len(batch) == 1:
                self.write_errors += 1
                row = batch[0]
                log.exception("session %s: event %s was not saved", row.key[2], row.event.id)
                return
        for row in batch:  # one bad row must not cost the others
            await self._commit([row])

    async def close(self) -> None:
        """Returns once every row appended, before or during the close, is written or lost
        (with no retries: a database out of reach must not hold the shutdown up)."""
        self._closing.set()
        self._hurry.set()
        while self._stored < self._appended and not (self._writer and self._writer.done()):
            await self.flush()
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.wait({self._writer})
            self._writer = None
        await super().close()


def _out_of_reach(exc: BaseException) -> bool:
    """The database is out of reach or busy, rather than refusing the rows."""
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
    return isinstance(exc, OSError | TimeoutError)


async def _write(db: AsyncSession, batch: list[_Row]) -> None:
    """One transaction: the events, their sessions' state and update time, and the app and
    user state they change (locked, as other instances may change them too)."""
    latest: dict[_Key, float] = {}
    for row in batch:
        latest[row.key] = max(latest.get(row.key, 0.0), row.timestamp)
    columns = tuple_(StorageSession.app_name, StorageSession.user_id, StorageSession.id)
    found = await db.scalars(
        select(StorageSession).where(columns.in_(sorted(latest))).with_for_update()
    )
    stored = {(s.app_name, s.user_id, s.id): s for s in found}
    if missing := set(latest) - set(stored):
        raise LookupError(f"no session {sorted(missing)[0]}")
    for row in batch:
        # the rows held in names: a mutated JSON column tells only a live parent object
        if row.app:
            app = await _state(db, StorageAppState, row.key[0])
            app.state.update(row.app)
        if row.user:
            user = await _state(db, StorageUserState, row.key[:2])
            user.state.update(row.user)
        if row.session:
            stored[row.key].state.update(row.session)
        db.add(row.event)
    for key, timestamp in latest.items():
        session = stored[key]
        if timestamp > session.get_update_timestamp():
            session.update_time = timestamp_to_utc_datetime(timestamp)


async def _state(
    db: AsyncSession,
    table: type[StorageAppState] | type[StorageUserState],
    key: str | tuple[str, str],
) -> StorageAppState | StorageUserState:
    """The app's or user's state row, locked; made if missing (ADK's `create_session` makes
    them, a store ADK's `SqliteSessionService` wrote may lack them)."""
    row = await db.get(table, key, with_for_update=True)
    if row is None:
        names = (
            {"app_name": key}
            if isinstance(key, str)
            else dict(zip(("app_name", "user_id"), key, strict=True))
        )
        row = table(**names, state={})
        db.add(row)
    return row
