"""The SQLite session service keeps one connection, and still persists every event."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from google.adk.events import Event
from google.genai import types

from telephony.sessions import PersistentSqliteSessionService


async def test_one_connection_for_many_writes_and_everything_on_disk(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    service = PersistentSqliteSessionService(str(db))
    session = await service.create_session(app_name="a", user_id="+1555", session_id="CA1")
    for n in range(50):
        event = Event(
            author="user",
            content=types.Content(role="user", parts=[types.Part(text=f"turn {n}")]),
        )
        await service.append_event(session, event)
    assert service.connections_opened == 1  # the stock service would have opened 52
    # another reader sees every event at once (each append was committed)
    with sqlite3.connect(db) as conn:
        count = conn.execute("SELECT COUNT(*) FROM events WHERE session_id = 'CA1'").fetchone()
        mode = conn.execute("PRAGMA journal_mode").fetchone()
    assert count == (50,) and mode == ("wal",)
    reloaded = await service.get_session(app_name="a", user_id="+1555", session_id="CA1")
    assert reloaded is not None and len(reloaded.events) == 50
    await service.close()
    assert service.connections_opened == 1
