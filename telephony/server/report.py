"""A recorded call as one HTML page an operator reads at a glance: both audio lanes on one
time axis (playable), the transcript, what happened when, and how long each answer took.

The page is a single file with everything inline (audio, styles, script): it opens from a
mail attachment or a ticket with no network and no server. Waveforms are reduced to one
min/max pair per column here, so the page carries a few kilobytes of drawing instead of
samples; the audio itself travels as 8 kHz mu-law (what the line carried), without its
silent stretches, and the page decodes it for the Web Audio API.

Times are seconds from the media stream's start (the WAV's origin), the recording's own clock
shifted; an event from before the stream (a greeting generated early) sits at 0.
"""

from __future__ import annotations

import base64
import html
import io
import json
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..audio import mulaw_encode
from ..call.recording import RATE, HeardWav, Recording, load_recording
from ..call.timeline import agent_turns, caller_speech, playout, responses

__all__ = [
    "CallReport",
    "Line",
    "Marker",
    "ReportError",
    "Response",
    "build_report",
    "find_recording",
    "heard_audio",
    "peaks",
    "render",
    "write_report",
]

COLUMNS = 1200
"""Waveform columns across the page: sharp on a wide screen, a few kilobytes per lane."""
SILENCE_GAP_S = 0.5
"""Digital silence at least this long is left out of the embedded audio (the page puts it
back): the agent's lane is silent whenever the caller talks."""
WAV_HEADER_BYTES = 44

MARKS = ("mark", "played")
"""Marker kinds drawn on the marks track (one per media message: too many for the events)."""
LABELS = {
    "start": "stream started",
    "stop": "stream stopped (caller hung up)",
    "end": "call ended",
    "dtmf": "key",
    "clear": "clear (Twilio's buffer emptied)",
    "hold": "agent audio held",
    "resume": "no interruption: agent plays on",
    "barge_in": "barge-in",
    "interrupted": "model: interrupted",
    "tool_call": "tool call",
    "tool_response": "tool response",
    "restart": "live session restarted",
    "reconnect": "live connection reopened",
    "released": "stream let go: Twilio plays the keys",
    "mark": "mark sent",
    "played": "mark played (echoed)",
}
COUNTED = (
    ("barge_in", "barge-ins"),
    ("clear", "clears"),
    ("interrupted", "model interruptions"),
    ("dtmf", "keys"),
    ("tool_call", "tool calls"),
    ("restart", "restarts"),
    ("reconnect", "reconnects"),
    ("mark", "marks sent"),
    ("played", "marks played"),
)
GLYPHS = {
    "start": "▶",
    "stop": "■",
    "end": "×",
    "dtmf": "",
    "clear": "✂",
    "hold": "‖",
    "resume": "↻",
    "barge_in": "⚡",
    "interrupted": "✋",
    "tool_call": "ƒ",
    "tool_response": "↩",
    "restart": "⟳",
    "reconnect": "⇄",
    "released": "⌨",
}


class ReportError(ValueError):
    """No report: the call's recording cannot be found or read."""


@dataclass(frozen=True)
class Marker:
    t: float
    kind: str
    """One of `LABELS`' keys."""
    detail: str = ""

    @property
    def label(self) -> str:
        return f"{LABELS[self.kind]} {self.detail}".strip()


@dataclass(frozen=True)
class Line:
    """A finished transcription: the caller's or the agent's."""

    t: float
    """When its first words were transcribed."""
    who: str
    text: str
    unheard: str = ""
    """The end of an agent line the caller never heard (they cut the reply off)."""

    @property
    def heard(self) -> str:
        if not self.unheard:
            return self.text
        words = self.text.split()
        return " ".join(words[: max(0, len(words) - len(self.unheard.split()))])


@dataclass(frozen=True)
class Response:
    caller_end: float
    """The caller stopped speaking (the bridge's VAD)."""
    agent_start: float
    """The caller began to hear the answer (Twilio's playout)."""

    @property
    def latency(self) -> float:
        return self.agent_start - self.caller_end


@dataclass
class CallReport:
    header: dict[str, Any]
    duration: float
    caller: np.ndarray
    """What the caller sent, int16 at 8 kHz from the stream's start."""
    agent: np.ndarray
    """What the caller heard of the agent, cut where `clear`s cut it."""
    markers: list[Marker] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    responses: list[Response] = field(default_factory=list)
    speech: list[tuple[float, float]] = field(default_factory=list)
    turns: list[tuple[float, float]] = field(default_factory=list)
    end_reason: str | None = None
    truncated: bool = False

    def count(self, kind: str) -> int:
        return sum(m.kind == kind for m in self.markers)


def heard_audio(recording: Recording) -> tuple[np.ndarray, np.ndarray]:
    """Both lanes rebuilt from the recording's messages the way the recorder writes its WAV,
    so a recording whose WAV is lost, or cut short by a crash, still has its audio. A second
    media stream (after keys the agent pressed) starts its timestamps at 0 again: its caller
    audio is placed from its own start."""
    origin = recording.stream_start
    if origin is None:
        return np.zeros(0, np.int16), np.zeros(0, np.int16)
    buffer = io.BytesIO()
    wav = HeardWav(buffer)
    stream_at = 0
    for entry in recording.entries:
        if entry.t < origin or entry.kind not in ("in", "out"):
            continue
        msg = entry.data["msg"]
        event = msg["event"]
        now = int((entry.t - origin) * RATE)
        if entry.kind == "in" and event == "start":
            stream_at = now
        elif entry.kind == "in" and event == "media":
            at = stream_at + int(msg["media"].get("timestamp", 0)) * RATE // 1000
            wav.caller(at, _payload(msg))
        elif entry.kind == "out" and event == "media":
            wav.agent(now, _payload(msg))
        elif entry.kind == "out" and event == "clear":
            wav.clear(now)
    wav.finish()
    frames = np.frombuffer(buffer.getvalue()[WAV_HEADER_BYTES:], "<i2").reshape(-1, 2)
    return frames[:, 0].astype(np.int16), frames[:, 1].astype(np.int16)


def _payload(msg: dict[str, Any]) -> bytes:
    return base64.b64decode(msg["media"]["payload"])


def build_report(recording: Recording) -> CallReport:
    origin = recording.stream_start or 0.0
    caller, agent = heard_audio(recording)
    last = max((e.t - origin for e in recording.entries), default=0.0)
    duration = max(len(caller) / RATE, len(agent) / RATE, last, 0.1)
    size = int(np.ceil(duration * RATE))
    caller = np.pad(caller, (0, size - len(caller)))
    agent = np.pad(agent, (0, size - len(agent)))

    def at(t: float) -> float:
        return min(duration, max(0.0, t - origin))

    frames: list[tuple[float, bytes]] = []
    sent: list[tuple[float, int]] = []
    clears: list[float] = []
    for t, msg in recording.twilio_in():
        if msg["event"] == "media":
            frames.append((t - origin, _payload(msg)))
    for t, msg in recording.twilio_out():
        if msg["event"] == "media":
            sent.append((at(t), len(_payload(msg))))
        elif msg["event"] == "clear":
            clears.append(t - origin)
    speech = caller_speech(frames)
    turns = agent_turns(playout(sent, clears))
    return CallReport(
        header=recording.header,
        duration=duration,
        caller=caller,
        agent=agent,
        markers=[Marker(at(t), kind, detail) for t, kind, detail in _events(recording)],
        lines=[Line(at(line.t), line.who, line.text, line.unheard) for line in _lines(recording)],
        responses=[Response(end, start) for end, start in responses(speech, turns)],
        speech=speech,
        turns=turns,
        end_reason=recording.end_reason,
        truncated=recording.truncated,
    )


def _events(recording: Recording) -> list[tuple[float, str, str]]:
    """(recording time, marker kind, detail) of everything a marker shows."""
    out: list[tuple[float, str, str]] = []
    restarts = 0
    for entry in recording.entries:
        data = entry.data
        if entry.kind in ("in", "out"):
            msg = data["msg"]
            event = msg["event"]
            if event == "start" and entry.kind == "in":
                out.append((entry.t, "start", str(msg.get("streamSid", ""))))
            elif event == "stop" and entry.kind == "in":
                out.append((entry.t, "stop", ""))
            elif event == "dtmf":
                out.append((entry.t, "dtmf", str(msg.get("dtmf", {}).get("digit", ""))))
            elif event == "clear":
                out.append((entry.t, "clear", ""))
            elif event == "mark":
                name = str(msg.get("mark", {}).get("name", ""))
                out.append((entry.t, "mark" if entry.kind == "out" else "played", name))
        elif entry.kind == "model":
            event = data["event"]
            if event == "interrupted":
                out.append((entry.t, "interrupted", ""))
            elif event == "tool_call":
                args = json.dumps(data.get("args", {}), ensure_ascii=False)
                out.append((entry.t, "tool_call", f"{data.get('name', '')}({args})"))
            elif event == "tool_response":
                out.append((entry.t, "tool_response", str(data.get("name", ""))))
        elif entry.kind == "call":
            event = data["event"]
            if event in ("hold", "barge_in"):
                out.append((entry.t, event, f"({data['source']})" if data.get("source") else ""))
            elif event == "resume":
                out.append((entry.t, "resume", ""))
            elif event == "released":
                out.append((entry.t, "released", str(data.get("digits", ""))))
            elif event == "reconnect":
                restarted = int(data.get("restarts", 0)) > restarts
                restarts = max(restarts, int(data.get("restarts", 0)))
                out.append((entry.t, "restart" if restarted else "reconnect", ""))
        elif entry.kind == "end":
            out.append((entry.t, "end", f"({data.get('reason', '')})"))
    return out


def _lines(recording: Recording) -> list[Line]:
    """Finished transcriptions in order, each at its first words; the agent's with the part
    the caller never heard, from the recorded heard-notes."""
    lines: list[Line] = []
    first: dict[str, float] = {}
    pieces: dict[str, str] = {"caller": "", "agent": ""}
    notes: list[tuple[float, dict[str, Any]]] = []
    for entry in recording.entries:
        data = entry.data
        if entry.kind == "call" and data["event"] == "heard":
            notes.append((entry.t, data))
        if entry.kind != "model" or not data["event"].endswith("_transcription"):
            continue
        who = "caller" if data["event"] == "input_transcription" else "agent"
        text = str(data.get("text", ""))
        if text or data.get("finished"):
            first.setdefault(who, entry.t)
        pieces[who] = text if data.get("finished") else pieces[who] + text
        if data.get("finished"):
            if pieces[who].strip():
                lines.append(Line(first[who], who, pieces[who].strip()))
            first.pop(who, None)
            pieces[who] = ""
    for who, text in pieces.items():  # the call ended mid-sentence
        if text.strip():
            lines.append(Line(first[who], who, text.strip()))
    lines.sort(key=lambda line: line.t)
    for t, note in notes:
        index = _noted_line(lines, t, note)
        if index is not None:
            line = lines[index]
            lines[index] = Line(line.t, line.who, line.text, str(note.get("unheard", "")))
    return lines


def _noted_line(lines: list[Line], t: float, note: dict[str, Any]) -> int | None:
    """The agent line a heard-note is about: its words are the note's heard and unheard
    words; of several such lines, the latest one begun before the note."""
    said = f"{note.get('heard', '')} {note.get('unheard', '')}".split()
    if not said:
        return None
    matches = [
        i for i, line in enumerate(lines) if line.who == "agent" and line.text.split() == said
    ]
    before = [i for i in matches if lines[i].t <= t]
    return (before or matches or [None])[-1]


def peaks(samples: np.ndarray, columns: int) -> np.ndarray:
    """(columns, 2): each column's lowest and highest sample, scaled to -1..1."""
    if len(samples) == 0:
        return np.zeros((columns, 2))
    edges = np.linspace(0, len(samples), columns + 1).astype(int)
    starts = np.minimum(edges[:-1], len(samples) - 1)
    ends = np.maximum(edges[1:], starts + 1)
    low = np.array([samples[s:e].min() for s, e in zip(starts, ends, strict=True)])
    high = np.array([samples[s:e].max() for s, e in zip(starts, ends, strict=True)])
    return np.stack((low, high), axis=1).astype(float) / 32768.0


def _wave_path(columns: np.ndarray) -> str:
    """A filled outline in a viewBox of (len(columns) x 100), at least a hairline thick."""
    mid, half = 50.0, 48.0
    top = [mid - max(hi * half, 0.5) for _, hi in columns]
    bottom = [mid - min(lo * half, -0.5) for lo, _ in columns]
    points = [f"{i},{y:.1f}" for i, y in enumerate(top)]
    points += [f"{i},{y:.1f}" for i, y in reversed(list(enumerate(bottom)))]
    return "M" + " L".join(points) + " Z"


def _audio_segments(samples: np.ndarray) -> list[list[Any]]:
    """[first sample, base64 mu-law] for each stretch that is not long digital silence."""
    sound = np.flatnonzero(samples)
    if len(sound) == 0:
        return []
    gap = int(SILENCE_GAP_S * RATE)
    breaks = np.flatnonzero(np.diff(sound) > gap)
    starts = np.concatenate(([sound[0]], sound[breaks + 1]))
    ends = np.concatenate((sound[breaks] + 1, [sound[-1] + 1]))
    out: list[list[Any]] = []
    for start, end in zip(starts, ends, strict=True):
        mulaw = mulaw_encode(samples[start:end].astype("<i2").tobytes())
        out.append([int(start), base64.b64encode(mulaw).decode("ascii")])
    return out


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


def _pct(t: float, duration: float) -> str:
    return f"{100.0 * t / duration:.4f}%"


def _fmt_time(t: float) -> str:
    minutes, seconds = divmod(t, 60.0)
    return f"{int(minutes)}:{seconds:05.2f}"


def _levels(markers: list[Marker], duration: float, rows: int = 3) -> list[int]:
    """A row for each marker's glyph, so glyphs close in time do not cover one another (when
    all rows are taken, the one free longest)."""
    min_gap = duration / 80
    last = [-np.inf] * rows
    out = []
    for marker in markers:
        free = [r for r in range(rows) if marker.t - last[r] >= min_gap]
        row = free[0] if free else int(np.argmin(last))
        last[row] = marker.t
        out.append(row)
    return out


def render(report: CallReport, columns: int = COLUMNS) -> str:
    """The page, as one string of HTML."""
    d = report.duration
    esc = html.escape
    header = report.header
    events = sorted((m for m in report.markers if m.kind not in MARKS), key=lambda m: m.t)
    marks = [m for m in report.markers if m.kind in MARKS]

    lanes = []
    for name, samples in (("caller", report.caller), ("agent", report.agent)):
        lanes.append(
            f'<div class="lane" id="lane-{name}"><div class="gutter">{name}'
            f'<button class="play" data-lane="{name}" title="play this lane">▶</button></div>'
            f'<div class="plot"><svg class="wave" viewBox="0 0 {columns} 100" '
            f'preserveAspectRatio="none"><path d="{_wave_path(peaks(samples, columns))}"/>'
            f"</svg></div></div>"
        )
    spans = "".join(
        f'<div class="span speech" style="left:{_pct(s, d)};width:{_pct(e - s, d)}" '
        f'title="caller speaking {s:.2f}-{e:.2f} s"></div>'
        for s, e in report.speech
    ) + "".join(
        f'<div class="span turn" style="left:{_pct(s, d)};width:{_pct(e - s, d)}" '
        f'title="agent heard {s:.2f}-{e:.2f} s"></div>'
        for s, e in report.turns
    )
    latency_row = "".join(
        f'<div class="latency" data-t="{r.caller_end:.4f}" '
        f'style="left:{_pct(r.caller_end, d)};width:{_pct(r.latency, d)}" '
        f'title="response latency {r.latency:.2f} s">{r.latency:.2f} s</div>'
        for r in report.responses
    )
    event_row = "".join(
        f'<div class="marker k-{m.kind}" data-kind="{m.kind}" data-t="{m.t:.4f}" '
        f'style="left:{_pct(m.t, d)}" title="{esc(_fmt_time(m.t))} {esc(m.label)}">'
        f'<span class="glyph row{row}">{esc(GLYPHS[m.kind])}'
        f"{esc(m.detail) if m.kind == 'dtmf' else ''}</span></div>"
        for m, row in zip(events, _levels(events, d), strict=True)
    )
    mark_row = "".join(  # one per media message: kept lean (no tooltip on a hairline)
        f'<div class="marker k-{m.kind}" data-kind="{m.kind}" data-t="{m.t:.4f}" '
        f'style="left:{_pct(m.t, d)}"></div>'
        for m in marks
    )
    ticks = "".join(
        f'<div class="tick" style="left:{_pct(t, d)}">{_fmt_time(t)[:-3]}</div>'
        for t in _tick_times(d)
    )
    timeline = (
        '<div id="timeline">'
        f'<div class="lane ruler"><div class="gutter"></div><div class="plot">{ticks}</div></div>'
        f'<div class="lane" id="events"><div class="gutter">events</div>'
        f'<div class="plot">{event_row}</div></div>'
        f"{''.join(lanes)}"
        f'<div class="lane" id="latencies"><div class="gutter">latency</div>'
        f'<div class="plot">{spans}{latency_row}</div></div>'
        '<div class="lane" id="marks"><div class="gutter" title="marks sent (top) and played '
        '(bottom)">marks</div>'
        f'<div class="plot">{mark_row}</div></div>'
        '<div id="overlay"><div class="gutter"></div><div class="plot" id="seek">'
        + "".join(
            f'<div class="guide k-{m.kind}" style="left:{_pct(m.t, d)}"></div>' for m in events
        )
        + '<div id="playhead"></div></div></div></div>'
    )

    transcript = "".join(
        f'<tr class="line {line.who}" data-t="{line.t:.4f}"><td class="time">'
        f'{_fmt_time(line.t)}</td><td class="who">{line.who}</td><td>{esc(line.heard)}'
        + (
            f' <s class="unheard" title="the caller never heard this">{esc(line.unheard)}</s>'
            if line.unheard
            else ""
        )
        + "</td></tr>"
        for line in report.lines
    )
    event_rows = "".join(
        f'<tr data-t="{m.t:.4f}"><td class="time">{_fmt_time(m.t)}</td>'
        f'<td><span class="k-{m.kind} chip">{esc(GLYPHS[m.kind])}</span> {esc(m.label)}</td></tr>'
        for m in events
    )
    latency_rows = "".join(
        f'<tr data-t="{r.caller_end:.4f}"><td>{n}</td><td class="time">'
        f'{_fmt_time(r.caller_end)}</td><td class="time">{_fmt_time(r.agent_start)}</td>'
        f'<td class="num">{r.latency:.2f} s</td></tr>'
        for n, r in enumerate(report.responses, 1)
    )
    facts = [
        ("call", str(header.get("call_sid", ""))),
        ("from → to", f"{header.get('caller', '')} → {header.get('callee', '')}"),
        ("agent", str(header.get("agent", ""))),
        ("started", str(header.get("started", ""))),
        ("length", f"{d:.1f} s"),
        ("ended", report.end_reason or "(no end recorded: the recording stops here)"),
        ("response latency", _latency_summary(report.responses)),
        ("counts", ", ".join(f"{name} {report.count(kind)}" for kind, name in COUNTED)),
    ]
    if report.truncated:
        facts.append(("note", "the recording's last line was cut short (a crash?)"))
    fact_rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
    data = {
        "duration": d,
        "rate": RATE,
        "lanes": {
            "caller": _audio_segments(report.caller),
            "agent": _audio_segments(report.agent),
        },
    }
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = f"Call {header.get('call_sid', '')}"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{_asset('report.css')}</style></head><body>"
        f'<h1>{esc(title)}</h1><table class="facts">{fact_rows}</table>'
        '<div id="controls"><button id="play-both" class="play" data-lane="both">▶ both</button>'
        '<button id="pause" disabled>❚❚ pause</button> <span id="clock">0:00.00</span>'
        f' / {_fmt_time(d)} <span class="hint">click the lanes to seek</span></div>'
        f"{timeline}"
        '<div class="tables"><section><h2>Transcript</h2>'
        f'<table id="transcript">{transcript or "<tr><td>(no transcription)</td></tr>"}</table>'
        "</section><section><h2>Response latency</h2>"
        '<table id="responses"><tr><th>turn</th><th>caller stopped</th><th>agent heard</th>'
        f"<th>latency</th></tr>{latency_rows}</table>"
        f'<h2>Events</h2><table id="event-list">{event_rows}</table></section></div>'
        f'<script type="application/json" id="report-data">{payload}</script>'
        f"<script>{_asset('report.js')}</script></body></html>\n"
    )


def _latency_summary(answers: list[Response]) -> str:
    if not answers:
        return "no answered turns"
    values = [r.latency for r in answers]
    return (
        f"median {statistics.median(values):.2f} s, max {max(values):.2f} s "
        f"over {len(values)} turn{'s' if len(values) != 1 else ''}"
    )


def _tick_times(duration: float) -> list[float]:
    step = next(s for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1e9) if duration / s <= 12)
    return [i * step for i in range(int(duration // step) + 1)]


def find_recording(call: str, record_dir: str | Path | None) -> Path:
    """`call` is a recording's path, or a call SID recorded in `record_dir`."""
    path = Path(call)
    if path.is_file():
        return path
    if record_dir:
        for suffix in (".jsonl", ".jsonl.gz"):
            candidate = Path(record_dir) / f"{call}{suffix}"
            if candidate.is_file():
                return candidate
        raise ReportError(f"{call}: no such file, and no recording of that call in {record_dir}")
    raise ReportError(
        f"{call}: no such file (to look a call SID up, give the recording directory: "
        "--record-dir or TELEPHONY_RECORD_DIR)"
    )


def write_report(call: str, out: str | Path | None, record_dir: str | Path | None) -> Path:
    """Writes the report of `call` (see `find_recording`) to `out`, by default CALLSID.html
    in the working directory; returns where."""
    path = find_recording(call, record_dir)
    try:
        recording = load_recording(path)
    except ValueError as exc:
        raise ReportError(str(exc)) from exc
    target = Path(out) if out else Path(f"{recording.header['call_sid']}.html")
    page = render(build_report(recording))
    try:
        target.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"{target}: cannot write: {exc}") from exc
    return target
