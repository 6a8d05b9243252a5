"""A real PostgreSQL server for the tests of several instances on one database.

`TELEPHONY_TEST_POSTGRES_URI` names a running server (CI starts Debian's cluster) whose role
may create databases; without it, a server of our own is started from Debian's binaries on a
temporary directory and a free port (as the `postgres` user when we are root: PostgreSQL
refuses to run as root). Without binaries the tests skip, unless
`TELEPHONY_REQUIRE_POSTGRES=1` (CI) makes that a failure. Each test gets a database of its own.
"""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import pytest

from .server import free_port

URI_VARIABLE = "TELEPHONY_TEST_POSTGRES_URI"
REQUIRE_VARIABLE = "TELEPHONY_REQUIRE_POSTGRES"


def unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_VARIABLE, "") not in ("", "0"):
        pytest.fail(f"PostgreSQL is required ({REQUIRE_VARIABLE}) but {reason}")
    pytest.skip(f"no PostgreSQL: {reason} (set {URI_VARIABLE} or install postgresql)")


def _bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _dsn(uri: str) -> str:
    """What asyncpg takes: the URL without SQLAlchemy's `+asyncpg`."""
    return uri.replace("postgresql+asyncpg://", "postgresql://", 1)


def execute(uri: str, sql: str) -> list[tuple[object, ...]]:
    """Runs one statement (in a thread of its own: the caller may be a test's event loop)."""

    async def run() -> list[tuple[object, ...]]:
        import asyncpg

        conn = await asyncpg.connect(_dsn(uri), timeout=5)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, run()).result()


@contextmanager
def postgres_server() -> Iterator[str]:
    """The server of `TELEPHONY_TEST_POSTGRES_URI`, or one of our own."""
    if importlib.util.find_spec("asyncpg") is None:
        unavailable("asyncpg is not installed (pip install -e '.[test]')")
    if uri := os.environ.get(URI_VARIABLE, ""):
        yield uri
        return
    with own_server() as uri:
        yield uri


@contextmanager
def own_server() -> Iterator[str]:
    """initdb + postgres on a temporary directory; yields the server's URI."""
    bindir = _bindir()
    if bindir is None:
        unavailable("no initdb found (Debian: apt-get install postgresql)")
    assert bindir is not None
    run_as: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("we are root and there is no postgres user to run the server as")
        run_as = ["runuser", "-u", "postgres", "--"]
    home = tempfile.mkdtemp(prefix="telephony-pg-")
    if owner is not None:
        os.chown(home, owner.pw_uid, owner.pw_gid)
    data = os.path.join(home, "data")
    subprocess.run(
        [*run_as, f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    server = subprocess.Popen(
        [*run_as, f"{bindir}/postgres", "-D", data, "-p", str(port), "-k", home]
        + ["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"],
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(home, "log"), "w"),  # noqa: SIM115 - the server's until it stops
    )
    uri = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                execute(uri, "SELECT 1")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if server.poll() is not None or time.monotonic() > deadline:
                    with open(os.path.join(home, "log")) as log:
                        raise RuntimeError(f"PostgreSQL did not start:\n{log.read()}") from None
                time.sleep(0.1)
        yield uri
    finally:
        server.terminate()  # runuser passes it on: a smart shutdown
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def fresh_database(server_uri: str) -> Iterator[str]:
    """A new, empty database on the server; yields its URI and drops it afterwards."""
    name = f"telephony_test_{uuid.uuid4().hex[:12]}"
    execute(server_uri, f'CREATE DATABASE "{name}"')
    parts = urlsplit(server_uri)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        execute(server_uri, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
