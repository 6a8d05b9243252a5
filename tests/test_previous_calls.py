"""A caller's earlier calls, summed up for the agent of their next one: the latest few, their
last lines, bounded; none for withheld numbers."""

from __future__ import annotations

from google.adk.events import Event
from google.adk.sessions import InMemorySessionService
from google.genai import types

from telephony.call.previous import (
    MAX_CALLS,
    MAX_LINE_CHARS,
    MAX_LINES,
    STARTED_KEY,
    previous_calls,
)


def line(who: str, text: str, at: float) -> Event:
    heard = types.Transcription(text=text, finished=True)
    if who == "caller":
        return Event(author="user", input_transcription=heard, timestamp=at)
    return Event(author="phone_agent", output_transcription=heard, timestamp=at)


async def _call(
    sessions: InMemorySessionService, sid: str, started: float, lines: list[str], user: str
) -> None:
    session = await sessions.create_session(
        app_name="a", user_id=user, session_id=sid, state={STARTED_KEY: started}
    )
    for n, text in enumerate(lines):
        await sessions.append_event(
            session, line("caller" if n % 2 else "agent", text, started + 10 * (n + 1))
        )


async def test_the_latest_calls_are_summed_up_oldest_first() -> None:
    sessions = InMemorySessionService()
    start = 1_790_000_000.0  # 2026-09-21 14:13:20 UTC
    for n in range(MAX_CALLS + 1):
        await _call(
            sessions, f"CA{n}", start + 3600 * n, [f"call {n} hello", f"call {n} hi"], "+1555"
        )
    await _call(sessions, "CAnow", start + 9 * 3600, [], "+1555")
    await _call(sessions, "CAother", start, ["someone else"], "+1666")
    notes = await previous_calls(sessions, app_name="a", user_id="+1555", session_id="CAnow")
    assert notes == "\n".join(
        [
            "Earlier calls from this number (oldest first):",
            "- 2026-09-21 15:13 UTC, 20 s:",
            "  agent: call 1 hello",
            "  caller: call 1 hi",
            "- 2026-09-21 16:13 UTC, 20 s:",
            "  agent: call 2 hello",
            "  caller: call 2 hi",
            "- 2026-09-21 17:13 UTC, 20 s:",
            "  agent: call 3 hello",
            "  caller: call 3 hi",
        ]
    )


async def test_each_call_keeps_its_last_lines_each_cut_short() -> None:
    sessions = InMemorySessionService()
    lines = [f"line {n}" for n in range(20)] + ["x" * 1000]
    await _call(sessions, "CA1", 1_790_000_000.0, lines, "+1555")
    notes = await previous_calls(sessions, app_name="a", user_id="+1555", session_id="CA2")
    kept = notes.splitlines()[2:]
    assert len(kept) == MAX_LINES
    assert kept[:-1] == [
        f"  {'agent' if n % 2 == 0 else 'caller'}: line {n}" for n in range(15, 20)
    ]
    assert len(kept[-1]) == len("  agent: ") + MAX_LINE_CHARS and kept[-1].endswith("…")
    assert "3 min 30 s" in notes


async def test_a_first_call_and_withheld_numbers_get_no_notes() -> None:
    sessions = InMemorySessionService()
    assert await previous_calls(sessions, app_name="a", user_id="+1555", session_id="CA1") == ""
    for withheld in ("anonymous", "unknown", "+266696687"):
        await _call(sessions, f"CA-{withheld}", 1_790_000_000.0, ["hi"], withheld)
        notes = await previous_calls(sessions, app_name="a", user_id=withheld, session_id="CAx")
        assert notes == ""
