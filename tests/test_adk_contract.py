"""What `telephony/call/supervisor.py` and `telephony/server/sessions.py` rely on in ADK
beyond its documented API, checked against the installed version (pinned to the minor version
these were checked on). When one fails after an upgrade, re-read ADK's live flow (or session
service) before relaxing the pin: the workaround may be obsolete, or silently broken."""

from __future__ import annotations

import asyncio
import inspect
from importlib import metadata
from pathlib import Path

from google.adk.agents import LlmAgent
from google.adk.agents.callback_context import CallbackContext
from google.adk.agents.invocation_context import InvocationContext
from google.adk.agents.live_request_queue import LiveRequestQueue
from google.adk.agents.run_config import RunConfig
from google.adk.events import Event, EventActions
from google.adk.live import _live_llm_flow
from google.adk.plugins import BasePlugin
from google.adk.plugins.plugin_manager import PluginManager
from google.adk.sessions import (
    BaseSessionService,
    DatabaseSessionService,
    InMemorySessionService,
    Session,
)
from google.adk.sessions.schemas import v1
from google.adk.sessions.schemas.shared import timestamp_to_utc_datetime
from sqlalchemy import select


def _context(queue: LiveRequestQueue) -> InvocationContext:
    return InvocationContext(
        session_service=InMemorySessionService(),
        invocation_id="e-1",
        agent=LlmAgent(name="agent"),
        session=Session(id="s", app_name="a", user_id="u"),
        live_request_queue=queue,
        run_config=RunConfig(),
    )


def test_the_installed_adk_is_the_checked_minor_version() -> None:
    assert metadata.version("google-adk").startswith("2.13.")


def test_the_request_queue_keeps_an_asyncio_queue() -> None:
    """`CallerAudioQueue.offer` reads its backlog from `_queue`."""
    assert isinstance(LiveRequestQueue()._queue, asyncio.Queue)


def test_a_callback_context_wraps_the_agents_own_invocation_context() -> None:
    """`HandleKeeper` puts the handle back on the context the agent's live flow runs with."""
    context = _context(LiveRequestQueue())
    assert CallbackContext(context)._invocation_context is context


def test_the_invocation_context_holds_the_resumption_handle_and_the_queue() -> None:
    fields = InvocationContext.model_fields
    assert fields["live_session_resumption_handle"].default is None
    queue = LiveRequestQueue()
    context = _context(queue)
    context.live_session_resumption_handle = "h"
    assert context.live_request_queue is queue


def test_the_live_flow_stores_every_update_and_reconnects_with_the_stored_handle() -> None:
    """The quirk `HandleKeeper` absorbs, and the handle it restores being the one used."""
    receive = inspect.getsource(_live_llm_flow.receive_from_model)
    assert "live_session_resumption_handle = (" in receive
    assert "live_session_resumption_update.new_handle" in receive
    run = inspect.getsource(_live_llm_flow.run_live_flow)
    assert "invocation_context.live_session_resumption_handle" in run
    assert "session_resumption.handle" in run  # seeded from RunConfig on a restart


def test_each_connection_reads_the_queue_from_a_sender_task_of_its_own() -> None:
    """How `CallerAudioQueue` tells connections apart."""
    send = _live_llm_flow.send_to_model
    assert inspect.iscoroutinefunction(send)
    assert list(inspect.signature(send).parameters) == [
        "flow",
        "llm_connection",
        "invocation_context",
        "llm_request",
    ]
    assert "await live_request_queue.get()" in inspect.getsource(send)
    run = inspect.getsource(_live_llm_flow.run_live_flow)
    assert "send_task = asyncio.create_task(\n              send_to_model(" in run


def test_the_live_flow_asks_the_queue_whether_it_is_closed_before_reconnecting() -> None:
    """Where `CallerAudioQueue.closed` sees failed connections and vetoes reconnects."""
    run = inspect.getsource(_live_llm_flow.run_live_flow)
    assert run.count("invocation_context.live_request_queue.closed") == 2
    assert isinstance(inspect.getattr_static(LiveRequestQueue, "closed"), property)


def test_plugins_run_in_list_order_with_the_callbacks_used() -> None:
    assert isinstance(PluginManager().plugins, list)
    for name, params in [
        ("before_agent_callback", ["self", "agent", "callback_context"]),
        ("on_event_callback", ["self", "invocation_context", "event"]),
    ]:
        assert list(inspect.signature(getattr(BasePlugin, name)).parameters) == params


# What `telephony/server/sessions.py` relies on: ADK's v1 schema classes (a module ADK does not
# export) and the in-memory half of `append_event` being `BaseSessionService`'s.


async def test_the_base_append_changes_only_the_session_in_memory(tmp_path: Path) -> None:
    service = DatabaseSessionService(f"sqlite+aiosqlite:///{tmp_path / 's.db'}")
    session = await service.create_session(app_name="a", user_id="u", session_id="s")
    event = Event(author="user", actions=EventActions(state_delta={"k": 1, "temp:t": 2}))
    assert await BaseSessionService.append_event(service, session, event) is event
    assert session.events == [event] and session.state == {"k": 1, "temp:t": 2}
    assert event.actions.state_delta == {"k": 1}  # temp state trimmed before storing
    stored = await service.get_session(app_name="a", user_id="u", session_id="s")
    assert stored is not None and stored.events == [] and stored.state == {}
    await service.close()


async def test_a_new_database_gets_schema_1_and_its_rows_are_the_v1_classes(
    tmp_path: Path,
) -> None:
    service = DatabaseSessionService(f"sqlite+aiosqlite:///{tmp_path / 's.db'}")
    await service.prepare_tables()
    async with service.database_session_factory() as db:
        version = await db.scalar(
            select(v1.StorageMetadata.value).where(v1.StorageMetadata.key == "schema_version")
        )
    assert version == "1"
    for table in (v1.StorageSession, v1.StorageEvent, v1.StorageAppState, v1.StorageUserState):
        assert table.metadata is v1.Base.metadata
    session = Session(id="s", app_name="a", user_id="u")
    event = Event(author="user", timestamp=1_790_000_000.5)
    row = v1.StorageEvent.from_event(session, event)
    assert (row.app_name, row.user_id, row.session_id, row.id) == ("a", "u", "s", event.id)
    assert row.timestamp == timestamp_to_utc_datetime(event.timestamp)
    assert row.timestamp.tzinfo is None
    assert row.event_data == event.model_dump(exclude_none=True, mode="json")
    assert callable(v1.StorageSession.get_update_timestamp)
    await service.close()
