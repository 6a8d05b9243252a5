"""Process-wide call metrics, rendered in the Prometheus text format at `GET /metrics`.

No client library: a handful of counters and one histogram, aggregated as calls end (the
per-call parts live in the call while it runs), so nothing here is on the audio path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..call.playback import Histogram

__all__ = ["Metrics"]


@dataclass
class Metrics:
    calls_total: int = 0
    calls_refused_total: int = 0
    barge_ins_total: int = 0
    false_barge_ins_total: int = 0
    model_restarts_total: int = 0
    model_reconnects_total: int = 0
    caller_audio_dropped_s: float = 0.0
    agent_audio_dropped_s: float = 0.0
    gaps: Histogram = field(default_factory=Histogram)
    """How late each agent audio message left after the audio before it had run out."""

    def render(
        self, *, active_calls: int, loop_lag_ms: float, loop_busy: float, events_lost: int
    ) -> str:
        def one(kind: str, name: str, help_text: str, value: float) -> list[str]:
            return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value:g}"]

        lines = [
            *one("gauge", "telephony_calls_active", "Calls in progress.", active_calls),
            *one("counter", "telephony_calls_total", "Calls that ended.", self.calls_total),
            *one(
                "counter",
                "telephony_calls_refused_total",
                "Calls turned away (capacity or shutdown).",
                self.calls_refused_total,
            ),
            *one(
                "counter",
                "telephony_barge_ins_total",
                "Agent turns the caller cut off (the rest was discarded).",
                self.barge_ins_total,
            ),
            *one(
                "counter",
                "telephony_false_barge_ins_total",
                "Sounds over the agent too short to interrupt it: its audio was held, then "
                "played on.",
                self.false_barge_ins_total,
            ),
            *one(
                "counter",
                "telephony_model_restarts_total",
                "Live sessions restarted after failing.",
                self.model_restarts_total,
            ),
            *one(
                "counter",
                "telephony_model_reconnects_total",
                "Live connections reopened mid-call (ADK's own reconnects and restarts).",
                self.model_reconnects_total,
            ),
            *one(
                "counter",
                "telephony_caller_audio_dropped_seconds_total",
                "Caller audio dropped while the model was not reading.",
                self.caller_audio_dropped_s,
            ),
            *one(
                "counter",
                "telephony_agent_audio_dropped_seconds_total",
                "Agent audio dropped because its queue was full.",
                self.agent_audio_dropped_s,
            ),
            *one(
                "counter",
                "telephony_session_events_lost_total",
                "Session events (transcript lines) the database would not take; each is logged.",
                events_lost,
            ),
            *one("gauge", "telephony_loop_lag_ms", "Event loop lateness.", loop_lag_ms),
            *one(
                "gauge",
                "telephony_loop_busy_ratio",
                "Share of the time the event loop spends computing.",
                loop_busy,
            ),
            *self.gaps.render(
                "telephony_agent_audio_gap_seconds",
                "Per agent audio message: how long the caller heard silence because it left late.",
            ),
        ]
        return "\n".join(lines) + "\n"
