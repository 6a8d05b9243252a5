"""`GET /metrics`: the process's calls in Prometheus' exposition format, through
`prometheus-client`, with its process collector (CPU seconds, memory, file descriptors).

A scrape adds the figures of the calls in progress to those of the calls that ended: a custom
`Collector` reads each running call's own counters (plain attributes of the call, its player
and its live supervisor) at scrape time. So values move while calls run, and nothing on the
audio path touches the client library: the call wing keeps counting as it did, in ints and
its own bucket `Histogram`, and needs no metrics interface (nor an import of this wing). The
other design, a sink of prometheus Counters and Histograms injected into each call, would put
the library on the path of every agent audio message: a `Counter.inc` cost 0.3 us and a
`Histogram.observe` 0.7 us on the development machine, against 0.02 us for an int and
0.13 us for the call's own histogram. Cheap either way; but a sink also has to be threaded
through `Call`, whereas the collector is one place that knows what a call counts. A call's
outcome is known only once it ends, which is when its figures move from "running" to "ended",
in the same step as the registry forgets it, so a scrape never counts it twice or not at all.
A scrape runs on the event loop: 0.4 ms with no call, 0.6 ms with 60 (development machine).

Each app has its own `CollectorRegistry` (several apps in one process, as in the tests, do
not collide).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..call import Call, Outcome
from ..call.call import REACTION_BUCKETS_S
from ..call.playback import BYTES_PER_SECOND, GAP_BUCKETS_S, RESPONSE_BUCKETS_S, Histogram
from .capacity import Admission, LoopMonitor

__all__ = ["DIRECTIONS", "Metrics", "ServerFigures", "direction", "metrics_registry"]

DIRECTIONS = ("inbound", "outbound")
FRAME_S = 0.02
"""Twilio's media frames, in which dropped caller audio is counted."""


def direction(twilio_direction: str) -> str:
    """Twilio's `inbound`, `outbound-api` and `outbound-dial` as the two a dashboard needs."""
    return "outbound" if twilio_direction.startswith("outbound") else "inbound"


@dataclass(frozen=True)
class _Count:
    name: str
    help: str
    read: Callable[[Call], float]


@dataclass(frozen=True)
class _Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    read: Callable[[Call], Histogram]


COUNTS = (
    _Count(
        "telephony_barge_ins_total",
        "Agent turns the caller cut off (the rest was discarded).",
        lambda call: call.barge_ins,
    ),
    _Count(
        "telephony_false_barge_ins_total",
        "Sounds over the agent too short to interrupt it: its audio was held, then played on.",
        lambda call: call.false_barge_ins,
    ),
    _Count(
        "telephony_clears_total",
        "clear messages sent to Twilio (holds and barge-ins).",
        lambda call: call.player.clears,
    ),
    _Count(
        "telephony_model_restarts_total",
        "Live sessions restarted after failing or stalling.",
        lambda call: call.model_restarts,
    ),
    _Count(
        "telephony_model_reconnects_total",
        "Live connections reopened mid-call (ADK's own reconnects and restarts).",
        lambda call: call.model_reconnects,
    ),
    _Count(
        "telephony_caller_audio_dropped_seconds_total",
        "Caller audio dropped while the model was not reading.",
        lambda call: call.caller_audio_dropped * FRAME_S,
    ),
    _Count(
        "telephony_agent_audio_dropped_seconds_total",
        "Agent audio dropped because its queue was full.",
        lambda call: call.player.overflow_bytes / BYTES_PER_SECOND,
    ),
    _Count(
        "telephony_agent_audio_underruns_total",
        "Agent audio messages that left more than 20 ms after the audio before them ran out "
        "(silence mid-reply).",
        lambda call: call.player.underruns,
    ),
)
HISTOGRAMS = (
    _Histogram(
        "telephony_response_latency_seconds",
        "Per answer: from the end of the caller's speech to the first agent audio sent.",
        RESPONSE_BUCKETS_S,
        lambda call: call.player.response_latency,
    ),
    _Histogram(
        "telephony_barge_in_reaction_seconds",
        "Per barge-in: from the onset of the caller's speech over the agent to the clear sent.",
        REACTION_BUCKETS_S,
        lambda call: call.barge_in_reaction,
    ),
    _Histogram(
        "telephony_agent_audio_gap_seconds",
        "Per agent audio message: how long the caller heard silence because it left late.",
        GAP_BUCKETS_S,
        lambda call: call.player.gaps,
    ),
)


class Metrics:
    """The figures of the calls that ended here, and of the calls turned away."""

    def __init__(self) -> None:
        self.counts = {count.name: 0.0 for count in COUNTS}
        self.histograms = {h.name: Histogram(h.buckets) for h in HISTOGRAMS}
        self.calls: Counter[tuple[str, str]] = Counter()
        """Ended calls by (direction, outcome)."""
        self.refusals: Counter[str] = Counter()
        """Calls turned away, by reason."""
        self.not_placed: Counter[str] = Counter()
        """Outbound calls `POST /calls` did not place, by reason."""

    def ended(self, call: Call) -> None:
        """The call's figures join the totals (the registry has just forgotten it)."""
        self.calls[direction(call.info.direction), call.outcome or Outcome.INTERNAL_ERROR] += 1
        for count in COUNTS:
            self.counts[count.name] += count.read(call)
        for h in HISTOGRAMS:
            self.histograms[h.name].merge(h.read(call))

    def refused(self, twilio_direction: str, reason: str) -> None:
        """A call turned away at the webhook (`reason`: a label, as `Refusal.reason`)."""
        self.calls[direction(twilio_direction), Outcome.REFUSED] += 1
        self.refusals[reason] += 1


@dataclass(frozen=True)
class ServerFigures:
    """What the process knows beyond its calls, read at scrape time."""

    load: LoopMonitor
    admission: Admission
    clock: Callable[[], float]
    """The event loop's (what `Admission` counts in)."""
    session_write_errors: Callable[[], int]


class _CallCollector(Collector):
    def __init__(
        self, metrics: Metrics, active: Callable[[], Iterable[Call]], server: ServerFigures
    ) -> None:
        self._metrics = metrics
        self._active = active
        self._server = server

    def collect(self) -> Iterator[Metric]:
        metrics, server, calls = self._metrics, self._server, list(self._active())
        running = Counter(direction(call.info.direction) for call in calls)
        active = GaugeMetricFamily(
            "telephony_calls_active",
            "Calls in progress (from the webhook on), by direction.",
            labels=["direction"],
        )
        for way in DIRECTIONS:
            active.add_metric([way], running[way])
        yield active
        ended = CounterMetricFamily(
            "telephony_calls_total",
            "Calls that ended, by direction and outcome (refused: turned away at the webhook).",
            labels=["direction", "outcome"],
        )
        for (way, outcome), n in sorted(metrics.calls.items()):
            ended.add_metric([way, outcome], n)
        yield ended
        yield _by_reason(
            "telephony_calls_refused_total",
            "Calls turned away with the busy message, by reason.",
            metrics.refusals,
        )
        yield _by_reason(
            "telephony_outbound_calls_not_placed_total",
            "Outbound calls asked for (POST /calls) and not placed, by reason.",
            metrics.not_placed,
        )
        for count in COUNTS:
            value = metrics.counts[count.name] + sum(count.read(call) for call in calls)
            yield CounterMetricFamily(count.name, count.help, value=value)
        for h in HISTOGRAMS:
            total = Histogram(h.buckets)
            for part in (metrics.histograms[h.name], *(h.read(call) for call in calls)):
                total.merge(part)
            yield _histogram(h, total)
        yield CounterMetricFamily(
            "telephony_session_events_lost_total",
            "Session events (transcript lines) the database would not take; each is logged.",
            value=server.session_write_errors(),
        )
        yield GaugeMetricFamily(
            "telephony_loop_lag_seconds",
            "Event loop lateness (smoothed).",
            server.load.lag_ms / 1000,
        )
        yield GaugeMetricFamily(
            "telephony_loop_busy_ratio",
            "Share of the time the event loop spends computing (smoothed).",
            server.load.busy,
        )
        admission = server.admission
        yield GaugeMetricFamily(
            "telephony_calls_starting",
            "Calls admitted within the last 5 s, charged the learnt cost before it shows.",
            admission.starting(server.clock()),
        )
        yield GaugeMetricFamily(
            "telephony_call_cost_ratio",
            "Share of the event loop one call takes (learnt; TELEPHONY_CALL_COST until then).",
            admission.cost,
        )
        if admission.budget:
            yield GaugeMetricFamily(
                "telephony_call_capacity",
                "Calls that fit in TELEPHONY_MAX_LOOP_BUSY at the learnt cost.",
                admission.capacity,
            )


def _histogram(h: _Histogram, counts: Histogram) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound, n in zip((*h.buckets, float("inf")), counts.counts, strict=True):
        cumulative += n
        buckets.append((floatToGoString(bound), float(cumulative)))
    return HistogramMetricFamily(h.name, h.help, buckets=buckets, sum_value=counts.total)


def metrics_registry(
    metrics: Metrics, active: Callable[[], Iterable[Call]], server: ServerFigures
) -> CollectorRegistry:
    """The app's own registry: the calls (`active`: those in progress), the server's figures,
    and the process's (CPU, memory, file descriptors, garbage collections)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_CallCollector(metrics, active, server))
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def _by_reason(name: str, help_text: str, counts: Counter[str]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=["reason"])
    for reason, n in sorted(counts.items()):
        family.add_metric([reason], n)
    return family
