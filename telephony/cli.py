"""The `telephony` command: `serve [AGENT]` runs the phone server under uvicorn,
`simulate CALLER.wav` places a simulated call, `call NUMBER [AGENT]` has Twilio call a number
for the running server (or for AGENT, served here for that one call), `report CALL` writes a
recorded call's report page, `calls list` / `calls show CALL_SID` print the call history."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dotenv import load_dotenv

from .agents import AgentLoadError
from .settings import Settings, SettingsError

if TYPE_CHECKING:
    from quart import Quart

__all__ = ["main"]

log = logging.getLogger("telephony.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="telephony", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="answer Twilio calls with an ADK agent")
    serve.add_argument(
        "agent",
        nargs="?",
        default=None,
        help="`echo` (offline), an agent folder in the `adk web` layout, "
        "or nothing for the built-in Gemini agent",
    )
    serve.add_argument("--host", help="address to listen on (TELEPHONY_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (TELEPHONY_PORT, default 8080)")
    serve.add_argument(
        "--public-url", help="https://host Twilio reaches this server at (TELEPHONY_PUBLIC_URL)"
    )
    serve.add_argument(
        "--session-uri",
        help="where sessions are kept: sqlite:///FILE, postgresql+asyncpg://USER:PW@HOST/DB or "
        "memory:// (TELEPHONY_SESSION_URI, default sqlite:///telephony_sessions.db)",
    )
    serve.add_argument("--session-db", help="deprecated: --session-uri sqlite:///FILE")
    serve.add_argument("--model", help="Gemini live model for the built-in agent (TELEPHONY_MODEL)")
    serve.add_argument(
        "--server-config",
        metavar="TOML",
        help="uvicorn settings (e.g. config/server.toml: keep-alive, pings, access log); the "
        "bind address comes from --host/--port",
    )
    serve.add_argument("--hypercorn-config", metavar="TOML", help=argparse.SUPPRESS)
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="serve a public https URL without TWILIO_AUTH_TOKEN (TELEPHONY_INSECURE)",
    )
    serve.add_argument(
        "--record",
        metavar="DIR",
        help="record every call into DIR as JSON Lines + WAV (TELEPHONY_RECORD_DIR; off)",
    )
    simulate = commands.add_parser(
        "simulate", help="place a simulated call (as Twilio would) and report how it went"
    )
    simulate.add_argument("wav", help="what the caller says: a WAV file (any rate, mono/stereo)")
    simulate.add_argument(
        "--url", help="a running server (e.g. http://127.0.0.1:8080); default: one in-process"
    )
    simulate.add_argument(
        "--agent",
        help="the in-process server's agent: `echo`, an agent folder, or `gemini` for the "
        "built-in Gemini agent (default: echo; with --gemini-standin: gemini)",
    )
    simulate.add_argument(
        "--gemini-standin",
        action="store_true",
        help="run the agent's Gemini model against a local Gemini Live stand-in (TLS on "
        "loopback): the production path (ADK, google-genai) with no key and no network",
    )
    simulate.add_argument(
        "--out", help="WAV of what the caller heard (default: CALLER-heard.wav beside CALLER)"
    )
    simulate.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="hang up once the agent has been quiet this long after the caller spoke (s)",
    )
    simulate.add_argument(
        "--max-seconds", type=float, default=300.0, help="hang up after this long at most"
    )
    line = simulate.add_argument_group(
        "a realistic line and caller", "all off by default: a perfect line and a quiet caller"
    )
    line.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="one-way network delay between Twilio and the server, each way (e.g. 150)",
    )
    line.add_argument(
        "--jitter-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="up to this much more per message, at random (never reordered; e.g. 25)",
    )
    line.add_argument("--seed", type=int, default=0, help="random seed for the jitter (0)")
    line.add_argument(
        "--backchannel-after",
        type=float,
        metavar="S",
        help='the caller says "mm-hm" once the agent\'s reply has been audible S seconds',
    )
    line.add_argument(
        "--cough-after",
        type=float,
        metavar="S",
        help="the caller coughs once the agent's reply has been audible S seconds",
    )
    line.add_argument(
        "--echo-db",
        type=float,
        metavar="DB",
        help="echo: what the caller hears goes back up at DB relative to it (e.g. -25)",
    )
    line.add_argument(
        "--echo-delay-ms",
        type=float,
        default=150.0,
        metavar="MS",
        help="how late that echo comes back (default 150)",
    )
    line.add_argument(
        "--keys", default="", metavar="DIGITS", help="keys to press after speaking (e.g. 1234#)"
    )
    line.add_argument(
        "--key-gap-ms",
        type=float,
        default=100.0,
        metavar="MS",
        help="time from one key to the next (default 100)",
    )
    call = commands.add_parser(
        "call",
        help="place an outbound call through Twilio; once answered it comes to the running "
        "server at TELEPHONY_PUBLIC_URL, whose agent talks (or to AGENT, served here)",
    )
    call.add_argument("to", help="the number to call (E.164, e.g. +15551234567) or a SIP URI")
    call.add_argument(
        "agent",
        nargs="?",
        default=None,
        help="serve this agent here for the one call, then exit once Twilio reports it over: "
        "`echo`, an agent folder, or `gemini` for the built-in agent (TELEPHONY_PUBLIC_URL "
        "must reach TELEPHONY_HOST:TELEPHONY_PORT)",
    )
    call.add_argument(
        "--from",
        dest="from_",
        default="",
        help="the caller ID: a number of your Twilio account or a verified caller ID "
        "(default TELEPHONY_CALLER_ID)",
    )
    report = commands.add_parser(
        "report", help="write a recorded call's report page: one self-contained HTML file"
    )
    report.add_argument(
        "call", help="a recording (CALLSID.jsonl or .jsonl.gz), or a call SID in --record-dir"
    )
    report.add_argument("-o", "--out", help="the HTML file to write (default: CALLSID.html here)")
    report.add_argument(
        "--record-dir", metavar="DIR", help="where calls are recorded (TELEPHONY_RECORD_DIR)"
    )
    calls = commands.add_parser("calls", help="the call history, from the session store")
    history = calls.add_subparsers(dest="calls_command", required=True)
    listing = history.add_parser("list", help="one line per call, latest first")
    listing.add_argument("--since", default="", help="2h, 3d, 1w ago, or an ISO date/time")
    listing.add_argument("--caller", default="", help="calls whose number contains this")
    listing.add_argument("--limit", type=int, default=50, help="at most this many (0: all)")
    show = history.add_parser("show", help="one call: who, how it ended, its timeline")
    show.add_argument("call_sid", help="the call's SID (CA...)")
    for command in (listing, show):
        command.add_argument(
            "--session-uri", help="the session store to read (TELEPHONY_SESSION_URI)"
        )
        command.add_argument("--session-db", help="deprecated: --session-uri sqlite:///FILE")
        command.add_argument(
            "--agent",
            help="the agent whose calls to read: `echo`, a folder, `gemini` (TELEPHONY_AGENT; "
            "default the built-in Gemini agent)",
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "hypercorn_config", None) is not None:
        parser.error(
            "--hypercorn-config is gone: the server is uvicorn now, whose settings "
            "--server-config FILE reads (see config/server.toml)"
        )
    load_dotenv()
    if args.command == "simulate":
        return _simulate(args)
    if args.command == "call" and args.agent is None:
        return _call(args)
    if args.command == "report":
        return _report(args)
    if args.command == "calls":
        return _calls(args)
    try:
        if args.command == "call":
            settings = Settings.from_env(agent="" if args.agent == "gemini" else args.agent)
            _need_public_url(settings)
        else:
            settings = Settings.from_env(
                agent=args.agent,
                host=args.host,
                port=args.port,
                public_url=args.public_url,
                session_uri=args.session_uri,
                session_db=args.session_db,
                model=args.model,
                record_dir=args.record,
                insecure=args.insecure,
            )
    except SettingsError as exc:
        print(f"telephony: {exc}", file=sys.stderr)
        return 2
    from .server.serving import DEFAULTS, ServerConfigError, read_server_config

    try:
        server_config = getattr(args, "server_config", None)
        options = read_server_config(server_config) if server_config else DEFAULTS
    except ServerConfigError as exc:
        print(f"telephony: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.log_format == "json":
        from .server.jsonlog import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    from .server.app import create_app

    try:
        app = create_app(settings)
    except AgentLoadError as exc:
        print(f"telephony: {exc}", file=sys.stderr)
        return 2
    if args.command == "call":
        return asyncio.run(_serve(app, settings, options, _one_call(app, args.to, args.from_)))
    return asyncio.run(_serve(app, settings, options))


def _need_public_url(settings: Settings) -> None:
    if not settings.public_url:
        raise SettingsError(
            "TELEPHONY_PUBLIC_URL must say where Twilio reaches the server that takes the call"
        )


def _one_call(app: Quart, to: str, from_: str) -> Callable[[], Awaitable[int]]:
    """`telephony call NUMBER AGENT`: once this process serves AGENT, place the call and wait
    until Twilio reports it over (a transfer or a key press outlives the stream)."""

    async def call() -> int:
        from .server.app import call_out, outbound_over
        from .twilio.rest import OutboundError

        try:
            sid = await call_out(app, to, from_)
        except OutboundError as exc:
            print(f"telephony: {exc}", file=sys.stderr)
            return 1
        except Exception:
            log.exception("the call to %s was not placed", to)
            return 1
        print(sid, flush=True)
        how = await outbound_over(app, sid)
        log.info("call %s: over (%s)", sid, how)
        if how.split()[0] == "completed":
            return 0
        print(f"telephony: the call to {to} was not completed: {how}", file=sys.stderr)
        return 1

    return call


def _call(args: argparse.Namespace) -> int:
    from .server.app import place_outbound
    from .twilio.rest import OutboundError

    try:
        settings = Settings.from_env()
        _need_public_url(settings)
    except SettingsError as exc:
        print(f"telephony: {exc}", file=sys.stderr)
        return 2
    try:
        sid = asyncio.run(place_outbound(settings, _origin(settings), args.to, args.from_))
    except OutboundError as exc:
        print(f"telephony: {exc}", file=sys.stderr)
        return 1
    print(sid)
    return 0


def _report(args: argparse.Namespace) -> int:
    from .server.report import ReportError, write_report

    try:
        settings = Settings.from_env(record_dir=args.record_dir)
        print(write_report(args.call, args.out, settings.record_dir))
    except (SettingsError, ReportError) as exc:
        print(f"telephony: {exc}", file=sys.stderr)
        return 2
    return 0


def _calls(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from .agents import load_agent
    from .server.history import BadQuery, HistoryError, calls_text
    from .server.sessions import SessionStoreError, WriteBehindSessionService

    try:
        agent = "" if args.agent == "gemini" else args.agent
        settings = Settings.from_env(
            agent=agent, session_uri=args.session_uri, session_db=args.session_db
        )
        store = _stored_sessions(settings)
        app_name = load_agent(settings.agent, settings).app.name
    except (SettingsError, AgentLoadError) as exc:
        print(f"telephony: {exc}", file=sys.stderr)
        return 2

    async def read() -> str:
        sessions = WriteBehindSessionService(store)
        try:
            return await calls_text(
                sessions,
                app_name,
                call_sid=getattr(args, "call_sid", ""),
                since=getattr(args, "since", ""),
                caller=getattr(args, "caller", ""),
                limit=getattr(args, "limit", 50),
                mask=settings.mask_callers,
            )
        finally:
            await sessions.close()

    try:
        print(asyncio.run(read()))
    except HistoryError as exc:
        print(f"telephony: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, BadQuery) else 1
    except (SQLAlchemyError, SessionStoreError, OSError) as exc:
        print(f"telephony: cannot read the session store: {exc}", file=sys.stderr)
        return 2
    return 0


def _stored_sessions(settings: Settings) -> str:
    """The session store to read the history from; an error for one that holds none (a
    store in memory, an SQLite file that is not there: opening it would create it)."""
    from sqlalchemy.engine import make_url

    store = settings.session_store()
    if store is None:
        raise SettingsError("sessions are kept in memory (TELEPHONY_SESSION_URI is empty)")
    url = make_url(store)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        raise SettingsError(f"no session database at {url.database!r}")
    return store


def _origin(settings: Settings) -> str:
    """The server the call comes to: the instance's own URL when several share the public one
    (the call's callbacks and stream all go to the instance that knows of it)."""
    return (settings.stream_url or settings.public_url).rstrip("/")


def _simulate(args: argparse.Namespace) -> int:
    from .testing.simulate_command import main_simulate

    try:
        agent = args.agent or ("gemini" if args.gemini_standin else "echo")
        settings = Settings.from_env(agent="" if agent == "gemini" else agent, session_uri="")
    except SettingsError as exc:
        print(f"telephony: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return main_simulate(args, settings)
    except AgentLoadError as exc:
        print(f"telephony: {exc}", file=sys.stderr)
        return 2


async def _serve(
    app: Quart,
    settings: Settings,
    options: dict[str, Any],
    work: Callable[[], Awaitable[int]] | None = None,
) -> int:
    """uvicorn, with our own SIGTERM/SIGINT handling: drain first (new calls are turned away
    politely, active ones finish or hear a goodbye), then stop listening; only then does
    uvicorn close what sockets are left. A second signal during the drain cuts it short.
    `work`, if given,
    starts once the server listens, and its end (its exit status) stops the server."""
    from .server.app import drain
    from .server.serving import Server, server_config

    server = Server(server_config(app, settings.host, settings.port, options))
    draining: list[asyncio.Task[None]] = []

    def stop() -> None:
        server.should_exit = True

    async def drain_then_stop() -> None:
        await drain(app, settings.drain_s)
        stop()

    def on_signal() -> None:
        if server.should_exit:  # the drain is over; forcing uvicorn would skip the app's
            # shutdown, and with it the session store's last writes
            log.warning("second signal: already stopping (sockets closing, then the app)")
        elif draining:
            log.warning("second signal: stopping now")
            stop()
        else:
            log.info("shutting down: draining calls for up to %.0f s", settings.drain_s)
            draining.append(asyncio.create_task(drain_then_stop()))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    log.info(
        "serving %s on http://%s:%d (webhook /voice)",
        settings.agent or "the built-in Gemini agent",
        settings.host,
        settings.port,
    )
    status: list[int] = []

    async def run_work(work: Callable[[], Awaitable[int]]) -> None:
        try:
            await _listening(settings.host, settings.port)
            status.append(await work())
        finally:
            stop()

    worker = asyncio.create_task(run_work(work)) if work is not None else None
    try:
        await server.serve()
    finally:
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
    log.info("stopped")
    return status[0] if status else 0 if worker is None else 1


async def _listening(host: str, port: int) -> None:
    """Returns once `host:port` takes connections: uvicorn binds only after the app's
    startup, and Twilio must not reach a closed port."""
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return


if __name__ == "__main__":
    sys.exit(main())
