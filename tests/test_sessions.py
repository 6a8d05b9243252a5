"""Sessions by URL, and the session service on SQLite and on PostgreSQL alike: events
written behind, in group commits; nothing lost, reads see every write before them, one bad
row costs no other; the rows are ADK's own, read by ADK's stock service."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
import sqlite3
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import pytest
from google.adk.events import Event, EventActions
from google.adk.sessions import DatabaseSessionService, Session
from google.adk.sessions.schemas import v0
from google.adk.sessions.sqlite_session_service import SqliteSessionService
from google.genai import types
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from telephony.cli import main
from telephony.server import sessions
from telephony.server.sessions import SessionStoreError, WriteBehindSessionService
from telephony.settings import Settings, SettingsError


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 's.db'}"
    return request.getfixturevalue("postgres_uri")


@pytest.fixture
async def stock(url: str) -> AsyncIterator[DatabaseSessionService]:
    """ADK's own service on the same database: what any other reader sees."""
    service = DatabaseSessionService(url)
    yield service
    await service.close()


def said(n: int, **state: object) -> Event:
    return Event(
        author="user",
        content=types.Content(role="user", parts=[types.Part(text=f"turn {n}")]),
        actions=EventActions(state_delta=dict(state)),
    )


async def stored(stock: DatabaseSessionService, session_id: str, user_id: str = "u") -> list[str]:
    session = await stock.get_session(app_name="a", user_id=user_id, session_id=session_id)
    assert session is not None
    return [e.content.parts[0].text for e in session.events if e.content and e.content.parts]


async def test_events_are_written_behind_in_group_commits(
    url: str, stock: DatabaseSessionService
) -> None:
    service = WriteBehindSessionService(url)
    session = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    for n in range(50):
        await service.append_event(session, said(n))
    # in memory at once; stored only once the writer has had its turn
    assert len(session.events) == 50
    assert service.batches_committed == 0
    await service.flush()
    assert await stored(stock, "CA1") == [f"turn {n}" for n in range(50)]
    assert service.batches_committed == 1  # the stock service commits 50 times
    assert service.connections_opened == 1
    await service.close()


async def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    service = WriteBehindSessionService(f"sqlite+aiosqlite:///{db}")
    session = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    await service.append_event(session, said(0))
    await service.close()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_read_sees_every_event_appended_before_it(url: str) -> None:
    """A live session restarted mid-call reloads its history: none of it may be in flight."""
    service = WriteBehindSessionService(url)
    session = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    for n in range(3):
        await service.append_event(session, said(n))
    reloaded = await service.get_session(app_name="a", user_id="u", session_id="CA1")
    assert reloaded is not None and len(reloaded.events) == 3
    listed = await service.list_sessions(app_name="a", user_id="u")
    assert [s.id for s in listed.sessions] == ["CA1"]
    # the reloaded session goes on being appended to, as a restarted live session does
    await service.append_event(reloaded, said(3))
    again = await service.get_session(app_name="a", user_id="u", session_id="CA1")
    assert again is not None and len(again.events) == 4
    await service.close()


async def test_a_read_does_not_wait_for_rows_appended_after_it(url: str) -> None:
    """On a busy server the queue never runs dry: a read waits for what was queued before it
    only, or it would wait for as long as calls go on talking."""
    service = WriteBehindSessionService(url)
    busy = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    quiet = await service.create_session(app_name="a", user_id="u", session_id="CA2")
    await service.append_event(quiet, said(0))
    talking = True

    async def chatter() -> None:
        n = 0
        while talking:
            await service.append_event(busy, said(n))
            n += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(chatter())
    read = await asyncio.wait_for(
        service.get_session(app_name="a", user_id="u", session_id="CA2"), 10
    )
    assert read is not None and len(read.events) == 1
    talking = False
    await task
    await service.close()
    assert service.write_errors == 0


async def test_state_deltas_are_stored_as_adk_stores_them(
    url: str, stock: DatabaseSessionService
) -> None:
    service = WriteBehindSessionService(url)
    session = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    await service.append_event(session, said(0, topic="weather", **{"user:lang": "fr"}))
    await service.append_event(session, said(1, topic="rain", **{"app:calls": 2, "temp:x": 1}))
    assert session.state["temp:x"] == 1  # for the rest of the invocation, never stored
    await service.close()
    again = await stock.get_session(app_name="a", user_id="u", session_id="CA1")
    assert again is not None
    assert [e.content.parts[0].text for e in again.events] == ["turn 0", "turn 1"]
    assert again.state == {"topic": "rain", "user:lang": "fr", "app:calls": 2}
    assert again.last_update_time == pytest.approx(session.last_update_time)
    # and ADK's own appends go on from there, its stale-session check satisfied
    await stock.append_event(again, said(2))
    assert await stored(stock, "CA1") == ["turn 0", "turn 1", "turn 2"]


async def test_a_row_that_cannot_be_written_costs_no_other_row(
    url: str, stock: DatabaseSessionService, caplog: pytest.LogCaptureFixture
) -> None:
    service = WriteBehindSessionService(url)
    kept = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    gone = await service.create_session(app_name="a", user_id="u", session_id="CA2")
    await stock.delete_session(app_name="a", user_id="u", session_id="CA2")  # behind its back
    await service.append_event(kept, said(0))
    await service.append_event(gone, said(1))
    await service.append_event(kept, said(2))
    with caplog.at_level(logging.ERROR, "telephony.server.sessions"):
        await service.flush()
    assert await stored(stock, "CA1") == ["turn 0", "turn 2"]
    assert service.write_errors == 1
    assert "session CA2: event" in caplog.text and "was not saved" in caplog.text
    # and the writer goes on
    await service.append_event(kept, said(3))
    await service.close()
    assert await stored(stock, "CA1") == ["turn 0", "turn 2", "turn 3"]


async def test_a_database_out_of_reach_for_a_while_costs_no_row(
    url: str, stock: DatabaseSessionService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch waits and is tried again whole (not row by row against a database that is
    down); meanwhile a read does not wait for it past `READ_WAIT_S`."""
    monkeypatch.setattr(sessions, "RETRY_S", (0.2,) * 6)
    monkeypatch.setattr(sessions, "READ_WAIT_S", 0.05)
    service = WriteBehindSessionService(url)
    session = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    write = service._transaction
    failures = [0]

    async def out_of_reach(batch: list[object]) -> None:
        if failures[0] < 2:
            failures[0] += 1
            raise OperationalError("connect", {}, ConnectionRefusedError("refused"))
        await write(batch)  # type: ignore[arg-type]

    monkeypatch.setattr(service, "_transaction", out_of_reach)
    for n in range(3):
        await service.append_event(session, said(n))
    started = asyncio.get_running_loop().time()
    assert await service.get_session(app_name="a", user_id="u", session_id="CA1") is not None
    assert asyncio.get_running_loop().time() - started < 0.15  # did not wait out the outage
    await service.flush()  # the database is back at the second retry
    await service.close()
    assert await stored(stock, "CA1") == ["turn 0", "turn 1", "turn 2"]
    assert (failures[0], service.batches_committed, service.write_errors) == (2, 1, 0)


async def test_a_database_out_of_reach_at_shutdown_does_not_hold_it_up(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows the database cannot take are counted lost at once: no retries, not row by row."""
    monkeypatch.setattr(sessions, "RETRY_S", (30.0,) * 6)
    monkeypatch.setattr(sessions, "GATHER_S", 0.0)
    service = WriteBehindSessionService(url)
    session = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    tries = [0]

    async def out_of_reach(batch: list[object]) -> None:
        tries[0] += 1
        raise OperationalError("connect", {}, ConnectionRefusedError("refused"))

    monkeypatch.setattr(service, "_transaction", out_of_reach)
    for n in range(3):
        await service.append_event(session, said(n))
    await asyncio.sleep(0.05)  # the writer has tried once and waits to try again
    started = asyncio.get_running_loop().time()
    await service.close()
    assert asyncio.get_running_loop().time() - started < 1.0
    assert (tries[0], service.write_errors) == (2, 3)


async def test_a_backlog_is_committed_in_bounded_batches(
    url: str, stock: DatabaseSessionService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sessions, "MAX_BATCH", 3)
    service = WriteBehindSessionService(url)
    session = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    for n in range(7):
        await service.append_event(session, said(n))
    await service.close()
    assert await stored(stock, "CA1") == [f"turn {n}" for n in range(7)]
    assert service.batches_committed == 3


async def test_rows_gather_into_one_transaction_unless_a_read_waits(
    url: str, stock: DatabaseSessionService
) -> None:
    """Rows appended within GATHER_S share a transaction; a new call's read of its history does
    not wait for the gathering to end."""
    service = WriteBehindSessionService(url)
    session = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    for n in range(3):
        await service.append_event(session, said(n))
        await asyncio.sleep(sessions.GATHER_S / 5)
    await asyncio.sleep(sessions.GATHER_S * 2)
    assert service.batches_committed == 1
    await service.append_event(session, said(3))
    started = asyncio.get_running_loop().time()
    read = await service.get_session(app_name="a", user_id="u", session_id="CA1")
    assert asyncio.get_running_loop().time() - started < sessions.GATHER_S / 2
    assert read is not None and len(read.events) == 4
    assert await stored(stock, "CA1") == [f"turn {n}" for n in range(4)]
    await service.close()


async def test_close_writes_everything_appended(url: str, stock: DatabaseSessionService) -> None:
    service = WriteBehindSessionService(url)
    session = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    for n in range(5):
        await service.append_event(session, said(n))
    await service.close()
    assert await stored(stock, "CA1") == [f"turn {n}" for n in range(5)]


async def test_partial_events_are_not_stored(url: str, stock: DatabaseSessionService) -> None:
    service = WriteBehindSessionService(url)
    session = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    partial = said(0)
    partial.partial = True
    await service.append_event(session, partial)
    await service.append_event(session, said(1))
    await service.close()
    assert await stored(stock, "CA1") == ["turn 1"] and len(session.events) == 1


async def test_two_instances_share_a_callers_state_without_losing_a_write(url: str) -> None:
    """Two servers on one database, each with a call of the same caller, both changing the
    caller's `user:` state at once: neither call's rows are refused as stale, no key lost."""
    first, second = WriteBehindSessionService(url), WriteBehindSessionService(url)
    one = await first.create_session(app_name="a", user_id="+1555", session_id="CA1")
    two = await second.create_session(app_name="a", user_id="+1555", session_id="CA2")
    for n in range(20):
        await first.append_event(one, said(n, **{f"user:from_first_{n}": n}))
        await second.append_event(two, said(n, **{f"user:from_second_{n}": n}))
        await asyncio.sleep(0)
    await asyncio.gather(first.flush(), second.flush())
    assert first.write_errors == second.write_errors == 0
    state = await first.get_user_state(app_name="a", user_id="+1555")
    assert len(state) == 40
    for service, sid in ((first, "CA1"), (second, "CA2")):
        session = await service.get_session(app_name="a", user_id="+1555", session_id=sid)
        assert session is not None and len(session.events) == 20
    await asyncio.gather(first.close(), second.close())


async def test_a_file_written_by_adks_sqlite_service_stays_readable(tmp_path: Path) -> None:
    """Before sessions took a URL, the server wrote ADK's `SqliteSessionService` format to
    the same default file: its calls are still read, and new ones written beside them."""
    db = tmp_path / "telephony_sessions.db"
    old = SqliteSessionService(str(db))
    earlier = await old.create_session(app_name="a", user_id="u", session_id="CA1")
    await old.append_event(earlier, said(0))
    service = WriteBehindSessionService(f"sqlite+aiosqlite:///{db}")
    assert await stored(service, "CA1") == ["turn 0"]  # type: ignore[arg-type]
    session = await service.create_session(app_name="a", user_id="u", session_id="CA2")
    await service.append_event(session, said(1, **{"user:seen": True}))
    listed = await service.list_sessions(app_name="a", user_id="u")
    assert sorted(s.id for s in listed.sessions) == ["CA1", "CA2"]
    assert await stored(service, "CA2") == ["turn 1"]  # type: ignore[arg-type]
    await service.close()


async def test_the_caller_never_waits_for_the_database(url: str) -> None:
    """`append_event` returns without giving the event loop up, while the writer is busy:
    no database round trip is on the response path (the stock service makes several).
    `bench/sessions.py` measures what that is worth."""
    service, stock = WriteBehindSessionService(url), DatabaseSessionService(url)
    ours = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    theirs = await stock.create_session(app_name="a", user_id="u", session_id="CA2")

    async def suspended(target: DatabaseSessionService, session: Session) -> int:
        """How many of 40 appends let other tasks run before they returned."""
        count = 0
        for n in range(40):
            ran: list[bool] = []
            asyncio.get_running_loop().call_soon(ran.append, True)
            await target.append_event(session, said(n))
            count += bool(ran)
            await asyncio.sleep(0)  # the writer's turn: it is busy during the next appends
        return count

    assert await suspended(service, ours) == 0
    assert await suspended(stock, theirs) == 40
    await service.close()
    await stock.close()


def test_session_uris_follow_adks_conventions() -> None:
    store = partial(Settings.from_env, {})
    assert store().session_store() == "sqlite+aiosqlite:///telephony_sessions.db"
    assert store(session_uri="sqlite:////var/lib/t.db").session_store() == (
        "sqlite+aiosqlite:////var/lib/t.db"
    )
    assert store(session_uri="sqlite+aiosqlite:///t.db").session_store() == (
        "sqlite+aiosqlite:///t.db"
    )
    for pg in ("postgresql://u:p@db/t", "postgresql+asyncpg://u:p@db/t"):
        assert store(session_uri=pg).session_store() == "postgresql+asyncpg://u:p@db/t"
    for memory in ("", "memory://"):
        assert store(session_uri=memory).session_store() is None
    # the deprecated setting, and the URL winning over it
    assert store(session_db="old.db").session_store() == "sqlite+aiosqlite:///old.db"
    assert store(session_db="").session_store() is None
    both = Settings.from_env({"TELEPHONY_SESSION_DB": "old.db", "TELEPHONY_SESSION_URI": ""})
    assert both.session_store() is None


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("mysql+aiomysql://u@h/db", "must be sqlite:///FILE, postgresql+asyncpg://"),
        ("postgres://u@h/db", "SQLAlchemy spells it postgresql://"),
        ("telephony_sessions.db", "must be a URL, e.g. sqlite:///telephony_sessions.db"),
        ("postgresql+psycopg2://u@h/db", "use postgresql+asyncpg:// (the asyncio driver)"),
        ("sqlite+pysqlite:///t.db", "use sqlite+aiosqlite://"),
        ("sqlite:///", "needs a file name"),
    ],
)
def test_a_session_uri_that_cannot_be_used_is_refused_at_start_up(
    uri: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SettingsError, match=re.escape(says)):
        Settings.from_env({"TELEPHONY_SESSION_URI": uri})
    assert main(["serve", "echo", "--session-uri", uri]) == 2
    assert says in capsys.readouterr().err


def test_a_missing_driver_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "asyncpg" else real(name)
    )
    with pytest.raises(SettingsError, match=r"needs asyncpg, not installed \(pip install"):
        Settings.from_env({"TELEPHONY_SESSION_URI": "postgresql://u@h/db"})


async def test_instances_starting_together_on_a_new_database_all_start(url: str) -> None:
    """They race to create ADK's tables; the losers find them made."""
    services = [WriteBehindSessionService(url) for _ in range(4)]
    await asyncio.gather(*(s.prepare_tables() for s in services))
    await asyncio.gather(*(s.close() for s in services))


async def test_a_database_of_adks_older_schema_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """ADK's schema 0 (events pickled, column by column) is not what the writer writes."""
    db = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{db}")
    v0.Base.metadata.create_all(engine)
    engine.dispose()
    service = WriteBehindSessionService(f"sqlite+aiosqlite:///{db}")
    with pytest.raises(SessionStoreError, match="schema 0 .*`adk migrate session`"):
        await service.prepare_tables()
    await service.close()
