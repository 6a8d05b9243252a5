"""Configuration from environment variables (and a `.env` file), validated once at start-up."""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from urllib.parse import urlsplit

from .twilio.targets import AllowList, TargetError, transfer_target

__all__ = ["DEFAULT_SESSION_URI", "Settings", "SettingsError", "session_url"]

DEFAULT_GREETING = "(The phone call has just connected. Greet the caller briefly.)"


class SettingsError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """Every knob of the server. Field `x_y` is read from environment variable `TELEPHONY_X_Y`,
    except the Twilio ones, which use Twilio's own names."""

    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    """Base URL Twilio reaches us at (https://...); signatures and the stream URL use it."""
    stream_url: str = ""
    """This instance's own base URL (https://host), when several instances share the webhook
    address: the TwiML sends each call's media stream back to the instance that answered it,
    and upgrade signatures are checked against it. Empty: the public URL."""
    twilio_auth_token: str = ""
    twilio_account_sid: str = ""
    twilio_api_key: str = ""
    """An API key SID (SK...) for placing calls; with `twilio_api_secret`. Without it, outbound
    calls authenticate with the account SID and auth token."""
    twilio_api_secret: str = ""
    caller_id: str = ""
    """The number outbound calls come from (a number of your Twilio account, or a verified
    caller ID), unless a call names its own."""
    admin_token: str = ""
    """Bearer token for `/metrics` and the details of `/healthz`. Empty: they are served only
    by a local server (loopback address, no public URL); otherwise `/healthz` says just its
    status and `/metrics` is refused."""
    calls_token: str = ""
    """Bearer token for `POST /calls`; empty: the endpoint refuses every request."""
    max_outbound_calls: int = 10
    """Outbound calls being placed or in progress at once beyond which `POST /calls` refuses."""
    rest_api_url: str = ""
    """Twilio's REST API base URL; empty: Twilio's own (tests point it at a stand-in)."""
    agent: str = ""
    """`echo`, an agent folder (adk web layout), or empty for the built-in Gemini agent."""
    model: str = ""
    """Live model of the built-in agent; empty: the default of the configured backend."""
    voice: str = ""
    language: str = ""
    greeting: str = DEFAULT_GREETING
    session_uri: str | None = None
    """Where ADK sessions are kept, in ADK's URL conventions: `sqlite:///FILE` (the default,
    `sqlite:///telephony_sessions.db`), `postgresql+asyncpg://user:password@host/db` for
    several instances on one database, or empty / `memory://` for in memory (lost when the
    server stops). See `session_store`."""
    session_db: str | None = None
    """Deprecated: an SQLite file, as `TELEPHONY_SESSION_URI=sqlite:///FILE` (empty: in
    memory); ignored when `session_uri` is set."""
    record_dir: str = ""
    """Record every call (JSON Lines + WAV) into this folder; empty: off (recordings hold
    personal data)."""
    playback_lead_ms: int = 400
    """How far ahead of the caller's ear we let Twilio buffer agent audio; the line's round
    trip, learnt from mark echoes, is added to it (up to 1.5 s in all)."""
    barge_in_aggressiveness: int = 3
    barge_in_frames: int = 4
    """20 ms speech frames (out of the last 6) that count as the caller talking over the agent."""
    barge_in_min_speech_ms: int = 500
    """Caller speech over the agent holds its audio at once; only this much speech discards the
    rest of its turn. Shorter sounds (a cough, an "mm-hm") resume it where it stopped."""
    barge_in_resume_ms: int = 600
    """Silence after a short sound over the agent before its held audio resumes."""
    keys_idle_s: float = 2.0
    """Key presses go to the model as one turn on `#` or after this long without a key."""
    caller_silence_ms: int = 1000
    """No media from the caller for this long ends the caller's audio stream for the model."""
    model_restarts: int = 3
    """Restarts of a failed live session before the caller hears an apology and is hung up."""
    model_stall_s: float = 15.0
    """The caller waits this long for any answer: the live session is restarted."""
    model_connections_per_minute: int = 6
    """Live connections a call may open within any 60 s (the first, ADK's reconnects after a
    go_away or a drop, and restarts); one more ends the call with the apology."""
    heard_notes: bool = True
    """After a barge-in, tell the model which words of its reply the caller heard (a partial
    turn in the live session): off if a model answers such turns badly."""
    max_call_s: float = 3600.0
    """A call's time limit: the model is asked to wrap up a minute before, then the caller
    hears a recorded goodbye and the call ends (0: none)."""
    caller_idle_s: float = 30.0
    """A caller silent this long after the agent finished is asked (through the model) whether
    they are still there; silent as long again, they hear the goodbye (0: never)."""
    previous_calls: int = 0
    """How many of a caller's earlier calls (their last lines) a new call's session starts
    with, as `user:telephony_previous_calls` (0: none). Off by default: a caller ID is easily
    forged, and whoever forges a customer's would hear what the agent knows of their calls."""
    transfer_to: str = ""
    """Where the built-in agent's `transfer_call` sends a caller who asks for a person (an
    E.164 number or a SIP URI); empty: it has no transfer tool."""
    transfer_allow: str = ""
    """Where any agent's `transfer_call` may send callers: numbers, number prefixes (`+1800*`),
    SIP URIs and SIP domains (`@example.com`), comma-separated; empty: only `transfer_to`."""
    max_calls: int = 0
    """Calls beyond this many at once are turned away with a busy message (0: no limit)."""
    max_loop_lag_ms: float = 50.0
    """New calls are turned away while the event loop runs this late (0: never): past it the
    process does not get a core often enough, and every call's audio would suffer."""
    max_loop_busy: float = 0.9
    """New calls are turned away while the event loop spends more than this share of its
    time computing, or would once every call admitted costs what calls have been measured to
    cost (0: never): the process has no time to spare, and one more call would make every
    call's answers late."""
    call_cost: float = 0.025
    """Share of the event loop one call is assumed to take until calls have settled and their
    cost is measured: a burst into a fresh process is admitted up to MAX_LOOP_BUSY / this
    (36). From the real path (`bench/realpath.py`: the Gemini agent through ADK and TLS), not
    the echo agent (which skips it): a talking call costs 1.6-2.6% of a core there, every call
    was good at 40 calls (70% of a core), and at 50 the process was saturated."""
    drain_s: float = 30.0
    """On SIGTERM, how long active calls may go on (new ones are turned away) before they
    hear a goodbye and end."""
    stream_connect_timeout_s: float = 30.0
    """A call answered by the webhook whose media stream never arrives is dropped after this."""
    log_level: str = "INFO"
    log_format: str = "text"
    """`text` (a line a person reads) or `json` (an object per line, with `call_sid`)."""
    mask_callers: bool = False
    """Logs show phone numbers as +*******1234, and no DTMF digits or transcripts."""
    insecure: bool = False
    """Serve a public https:// URL without TWILIO_AUTH_TOKEN (anyone could then place calls
    on your model's bill): refused unless this is set."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            name = f.name.upper() if f.name.startswith("twilio_") else f"TELEPHONY_{f.name.upper()}"
            if name in env:
                values[f.name] = _coerce(name, env[name], type(f.default))
        if "PORT" in env and "TELEPHONY_PORT" not in env:
            values["port"] = _coerce("PORT", env["PORT"], int)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        for name, url in (("PUBLIC_URL", self.public_url), ("STREAM_URL", self.stream_url)):
            _check_origin(f"TELEPHONY_{name}", url)
            if url.startswith("https://") and not self.twilio_auth_token and not self.insecure:
                raise SettingsError(
                    f"TELEPHONY_{name} is public (https) but TWILIO_AUTH_TOKEN is not set: "
                    "anyone could call in. Set the token, or TELEPHONY_INSECURE=1 to accept that"
                )
        if not 0 < self.port < 65536:
            raise SettingsError(f"TELEPHONY_PORT must be 1-65535, got {self.port}")
        if not 0 <= self.barge_in_aggressiveness <= 3:
            raise SettingsError("TELEPHONY_BARGE_IN_AGGRESSIVENESS must be 0-3")
        if not 1 <= self.barge_in_frames <= 6:
            raise SettingsError("TELEPHONY_BARGE_IN_FRAMES must be 1-6")
        if not 0 <= self.previous_calls <= 20:
            raise SettingsError("TELEPHONY_PREVIOUS_CALLS must be 0-20")
        if self.max_calls < 0 or self.max_loop_lag_ms < 0:
            raise SettingsError("TELEPHONY_MAX_CALLS and TELEPHONY_MAX_LOOP_LAG_MS must be >= 0")
        if not 0 <= self.max_loop_busy <= 1:
            raise SettingsError("TELEPHONY_MAX_LOOP_BUSY must be between 0 and 1")
        if not 0 < self.call_cost <= 1:
            raise SettingsError("TELEPHONY_CALL_COST must be above 0 and at most 1")
        if self.model_restarts < 0:
            raise SettingsError("TELEPHONY_MODEL_RESTARTS must be 0 or more")
        if self.model_connections_per_minute < 1:
            raise SettingsError("TELEPHONY_MODEL_CONNECTIONS_PER_MINUTE must be at least 1")
        if self.model_stall_s <= 0:
            raise SettingsError("TELEPHONY_MODEL_STALL_S must be positive")
        if self.playback_lead_ms < 40:
            raise SettingsError("TELEPHONY_PLAYBACK_LEAD_MS must be at least 40")
        if self.caller_silence_ms < 100:
            raise SettingsError("TELEPHONY_CALLER_SILENCE_MS must be at least 100")
        if self.barge_in_min_speech_ms < 0:
            raise SettingsError("TELEPHONY_BARGE_IN_MIN_SPEECH_MS must be 0 or more")
        if not 20 <= self.barge_in_resume_ms <= 600:
            raise SettingsError("TELEPHONY_BARGE_IN_RESUME_MS must be 20-600")
        if self.max_outbound_calls < 0:
            raise SettingsError("TELEPHONY_MAX_OUTBOUND_CALLS must be 0 or more")
        if self.caller_id:
            try:
                transfer_target(self.caller_id)
            except TargetError as exc:
                raise SettingsError(f"TELEPHONY_CALLER_ID: {exc}") from None
        for name, token in (("CALLS", self.calls_token), ("ADMIN", self.admin_token)):
            if token and len(token) < 16:
                raise SettingsError(f"TELEPHONY_{name}_TOKEN must be at least 16 characters")
        if not self.local and not self.twilio_auth_token and not self.insecure:
            raise SettingsError(
                f"TELEPHONY_HOST {self.host} is reachable from other machines but "
                "TWILIO_AUTH_TOKEN is not set: anyone could start calls on your model's bill. "
                "Set the token, or TELEPHONY_INSECURE=1 to accept that"
            )
        if self.max_call_s < 0 or self.caller_idle_s < 0:
            raise SettingsError("TELEPHONY_MAX_CALL_S and TELEPHONY_CALLER_IDLE_S must be >= 0")
        if 0 < self.caller_idle_s < 5:
            raise SettingsError("TELEPHONY_CALLER_IDLE_S must be 0 (off) or at least 5")
        if self.keys_idle_s <= 0:
            raise SettingsError("TELEPHONY_KEYS_IDLE_S must be positive")
        if self.drain_s < 0 or self.stream_connect_timeout_s <= 0:
            raise SettingsError(
                "TELEPHONY_DRAIN_S must be 0 or more and TELEPHONY_STREAM_CONNECT_TIMEOUT_S "
                "positive"
            )
        self.session_store()
        try:
            transfers = self.transfers()
        except TargetError as exc:
            raise SettingsError(
                f"TELEPHONY_TRANSFER_TO / TELEPHONY_TRANSFER_ALLOW: {exc}"
            ) from None
        if self.transfer_to and not transfers.allows(transfer_target(self.transfer_to)):
            raise SettingsError("TELEPHONY_TRANSFER_TO is not in TELEPHONY_TRANSFER_ALLOW")
        if self.log_format not in ("text", "json"):
            raise SettingsError(
                f"TELEPHONY_LOG_FORMAT must be text or json, got {self.log_format!r}"
            )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError(
                "TELEPHONY_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, "
                f"got {self.log_level!r}"
            )

    @property
    def local(self) -> bool:
        """Listening on a loopback address only: nobody else can reach the server directly."""
        return self.host in ("127.0.0.1", "::1", "localhost") or self.host.startswith("127.")

    def session_store(self) -> str | None:
        """The SQLAlchemy URL of the session database (with its asyncio driver), or None for
        sessions in memory. Raises `SettingsError` for a URL this server cannot use."""
        if self.session_db is not None and self.session_uri is None:
            return session_url(f"sqlite:///{self.session_db}" if self.session_db else "")
        return session_url(DEFAULT_SESSION_URI if self.session_uri is None else self.session_uri)

    def transfers(self) -> AllowList:
        """Where transfers may go (raises `TargetError` for a malformed entry)."""
        return AllowList.parse(self.transfer_allow or self.transfer_to)


DEFAULT_SESSION_URI = "sqlite:///telephony_sessions.db"
"""The file earlier versions wrote to by default (`TELEPHONY_SESSION_DB`), in the working
directory."""

_ASYNC_DRIVERS = {"sqlite": "aiosqlite", "postgresql": "asyncpg"}
"""The driver each database is used through (SQLAlchemy's asyncio extension takes no other),
with the package that provides it."""


def session_url(uri: str) -> str | None:
    """`TELEPHONY_SESSION_URI` as an SQLAlchemy URL with its asyncio driver (None: in memory):
    ADK's conventions, where `sqlite:///name` is a file relative to the working directory and
    `sqlite:////path` an absolute one."""
    name = "TELEPHONY_SESSION_URI"
    if uri.strip() in ("", "memory://", "sqlite://"):
        return None
    scheme, sep, rest = uri.partition("://")
    database, _, driver = scheme.partition("+")
    if not sep:
        raise SettingsError(f"{name} must be a URL, e.g. sqlite:///{uri} for that file")
    if database not in _ASYNC_DRIVERS:
        hint = " (SQLAlchemy spells it postgresql://)" if database == "postgres" else ""
        raise SettingsError(
            f"{name} must be sqlite:///FILE, postgresql+asyncpg://USER:PASSWORD@HOST/DB or "
            f"memory://, got a {scheme!r} URL{hint}"
        )
    wanted = _ASYNC_DRIVERS[database]
    if driver not in ("", wanted):
        raise SettingsError(
            f"{name}: use {database}+{wanted}:// (the asyncio driver), not {driver}"
        )
    if database == "sqlite" and rest in ("/", ""):
        raise SettingsError(f"{name}: sqlite:/// needs a file name (sqlite:///sessions.db)")
    missing = [m for m in ("sqlalchemy", wanted) if importlib.util.find_spec(m) is None]
    if missing:
        extra = " (pip install 'telephony[postgres]')" if wanted == "asyncpg" else ""
        raise SettingsError(f"{name} needs {' and '.join(missing)}, not installed{extra}")
    return f"{database}+{wanted}://{rest}"


def _check_origin(name: str, url: str) -> None:
    if not url:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise SettingsError(f"{name} must look like https://host, got {url!r}")
    if parts.path not in ("", "/") or parts.query:
        raise SettingsError(f"{name} must be a bare origin (no path, no query)")


def _coerce(name: str, raw: str, kind: type) -> object:
    if kind is bool:
        flag = raw.strip().lower()
        if flag in ("1", "true", "yes", "on"):
            return True
        if flag in ("", "0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {raw!r}")
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(raw)
            return value
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    return raw
