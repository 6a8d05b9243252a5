"""What `telephony/call/supervisor.py` relies on in ADK beyond its documented API, checked against
the installed version (pinned to the minor version these were checked on). When one fails after
an upgrade, re-read ADK's live flow before relaxing the pin: the workaround may be obsolete, or
silently broken."""

from __future__ import annotations

import asyncio
import inspect
from importlib import metadata

from google.adk.agents import LlmAgent
from google.adk.agents.callback_context import CallbackContext
from google.adk.agents.invocation_context import InvocationContext
from google.adk.agents.live_request_queue import LiveRequestQueue
from google.adk.agents.run_config import RunConfig
from google.adk.live import _live_llm_flow
from google.adk.plugins import BasePlugin
from google.adk.plugins.plugin_manager import PluginManager
from google.adk.sessions import InMemorySessionService, Session


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
