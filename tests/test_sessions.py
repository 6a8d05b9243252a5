"""The SQLite session service: events written behind, in group commits, on one connection;
nothing lost, reads see every write before them, one bad row costs no other."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
from google.adk.events import Event, EventActions
from google.adk.sessions.sqlite_session_service import SqliteSessionService
from google.genai import types

from telephony.server.sessions import PersistentSqliteSessionService


def said(n: int, **state: object) -> Event:
    return Event(
        author="user",
        content=types.Content(role="user", parts=[types.Part(text=f"turn {n}")]),
        actions=EventActions(state_delta=dict(state)),
    )


def stored(db: Path, session_id: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT event_data FROM events WHERE session_id = ? ORDER BY timestamp", (session_id,)
        ).fetchall()
    return [Event.model_validate_json(data).content.parts[0].text for (data,) in rows]


async def test_events_are_written_behind_in_group_commits_on_one_connection(
    tmp_path: Path,
) -> None:
    db = tmp_path / "s.db"
    service = PersistentSqliteSessionService(str(db))
    session = await service.create_session(app_name="a", user_id="+1555", session_id="CA1")
    for n in range(50):
        await service.append_event(session, said(n))
    # in memory at once; on disk only once the writer has had its turn
    assert len(session.events) == 50
    assert stored(db, "CA1") == []
    await service.flush()
    assert stored(db, "CA1") == [f"turn {n}" for n in range(50)]
    assert service.batches_committed == 1  # the stock service commits 50 times
    assert service.connections_opened == 1  # and opens 51 connections
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    await service.close()


async def test_a_read_sees_every_event_appended_before_it(tmp_path: Path) -> None:
    """A live session restarted mid-call reloads its history: none of it may be in flight."""
    service = PersistentSqliteSessionService(str(tmp_path / "s.db"))
    session = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    for n in range(3):
        await service.append_event(session, said(n))
    reloaded = await service.get_session(app_name="a", user_id="u", session_id="CA1")
    assert reloaded is not None and len(reloaded.events) == 3
    listed = await service.list_sessions(app_name="a", user_id="u")
    assert [s.id for s in listed.sessions] == ["CA1"]
    await service.close()


async def test_state_deltas_are_stored_as_adk_stores_them(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    service = PersistentSqliteSessionService(str(db))
    session = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    await service.append_event(session, said(0, topic="weather", **{"user:lang": "fr"}))
    await service.append_event(session, said(1, topic="rain", **{"app:calls": 2, "temp:x": 1}))
    await service.close()
    # the stock service, reading the same file, sees what it would have written itself
    stock = SqliteSessionService(str(db))
    again = await stock.get_session(app_name="a", user_id="u", session_id="CA1")
    assert again is not None
    assert [e.content.parts[0].text for e in again.events] == ["turn 0", "turn 1"]
    assert again.state == {"topic": "rain", "user:lang": "fr", "app:calls": 2}
    assert again.last_update_time == pytest.approx(session.last_update_time)


async def test_a_row_that_cannot_be_written_costs_no_other_row(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "s.db"
    service = PersistentSqliteSessionService(str(db))
    kept = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    gone = await service.create_session(app_name="a", user_id="u", session_id="CA2")
    with sqlite3.connect(db) as conn:  # deleted behind the service's back
        conn.execute("DELETE FROM sessions WHERE id = 'CA2'")
    await service.append_event(kept, said(0))
    await service.append_event(gone, said(1))
    await service.append_event(kept, said(2))
    with caplog.at_level(logging.ERROR, "telephony.server.sessions"):
        await service.flush()
    assert stored(db, "CA1") == ["turn 0", "turn 2"]
    assert service.write_errors == 1
    assert "session CA2: event" in caplog.text and "was not saved" in caplog.text
    # and the writer goes on
    await service.append_event(kept, said(3))
    await service.close()
    assert stored(db, "CA1") == ["turn 0", "turn 2", "turn 3"]


async def test_close_writes_everything_appended(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    service = PersistentSqliteSessionService(str(db))
    session = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    for n in range(5):
        await service.append_event(session, said(n))
    await service.close()
    assert stored(db, "CA1") == [f"turn {n}" for n in range(5)]


async def test_partial_events_are_not_stored(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    service = PersistentSqliteSessionService(str(db))
    session = await service.create_session(app_name="a", user_id="u", session_id="CA1")
    partial = said(0)
    partial.partial = True
    await service.append_event(session, partial)
    await service.append_event(session, said(1))
    await service.close()
    assert stored(db, "CA1") == ["turn 1"] and len(session.events) == 1
