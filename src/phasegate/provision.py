"""A throwaway PostgreSQL for tests and the demo, on any machine with Python.

Order: PHASEGATE_TEST_DATABASE_URL (or a URL the caller passes) → testcontainers when a
Docker daemon answers → an embedded server from the `pgserver` wheel. Each consumer then
creates its own fresh databases on that server, so tests stay independent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from phasegate.db import libpq_url, mask_url, normalize_url
from phasegate.errors import RuntimeFailure

TEST_URL_ENV = "PHASEGATE_TEST_DATABASE_URL"


@dataclass
class Server:
    """A PostgreSQL server we may create and drop databases on."""

    url: str  # SQLAlchemy URL of its maintenance database
    kind: str  # "external" | "testcontainers" | "embedded"
    _closer: Any = field(default=None, repr=False)

    def url_for(self, database: str) -> str:
        return make_url(self.url).set(database=database).render_as_string(hide_password=False)

    def create_database(self, prefix: str = "phasegate", template: str | None = None) -> str:
        """A new, empty (or template-cloned) database; returns its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        with self._admin() as conn:
            conn.execute(query)
        return self.url_for(name)

    def drop_database(self, url: str) -> None:
        name = make_url(url).database
        with self._admin() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    @contextlib.contextmanager
    def _admin(self) -> Iterator[psycopg.Connection]:
        with psycopg.connect(libpq_url(self.url), autocommit=True) as conn:
            yield conn

    @property
    def description(self) -> str:
        return f"{self.kind} PostgreSQL at {mask_url(self.url)}"


def start(url: str | None = None) -> Server:
    """Find or start a server: explicit URL, env URL, testcontainers, then pgserver."""
    url = url or os.environ.get(TEST_URL_ENV)
    if url:
        server = Server(normalize_url(url), "external")
        _check(server)
        return server
    if docker_answers():
        return _testcontainers()
    return _embedded()


def docker_answers() -> bool:
    """True when a Docker daemon is reachable (a socket that accepts a connection)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return bool(os.environ.get("DOCKER_HOST"))
    path = host.removeprefix("unix://")
    if not os.path.exists(path):
        return False
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(1)
        sock.connect(path)
        sock.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
        return b"OK" in sock.recv(256)
    return False


def _check(server: Server) -> None:
    try:
        with server._admin() as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise RuntimeFailure(
            f"cannot reach {server.description}: {str(exc).strip().splitlines()[-1]}"
        ) from None


def _testcontainers() -> Server:
    from testcontainers.postgres import PostgresContainer  # optional: only with Docker

    container = PostgresContainer("postgres:16-alpine", driver="psycopg")
    container.start()
    return Server(normalize_url(container.get_connection_url()), "testcontainers", container.stop)


@contextlib.contextmanager
def _quiet_runtime_dir() -> Iterator[None]:
    """pgserver asks platformdirs for a runtime directory, which warns on every machine
    without a private XDG_RUNTIME_DIR (containers, CI): noise in the demo's output, and
    the fallback it takes (/tmp/runtime-<uid>) is fine."""
    with warnings.catch_warnings():
        # "XDG_RUNTIME_DIR is not set", "XDG_RUNTIME_DIR /tmp has mode 0777", ...
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        yield


def _embedded() -> Server:
    try:
        with _quiet_runtime_dir():
            import pgserver
    except ImportError:
        raise RuntimeFailure(
            "no PostgreSQL available: set PHASEGATE_TEST_DATABASE_URL or --database-url, "
            "start Docker, or install the embedded server: pip install 'phasegate[embedded]'"
        ) from None
    directory = tempfile.mkdtemp(prefix="phasegate-pg-")
    try:
        with _quiet_runtime_dir():
            server = pgserver.get_server(directory, cleanup_mode="stop")
    except Exception as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeFailure(f"the embedded PostgreSQL did not start: {exc}") from None

    def stop() -> None:
        with contextlib.suppress(Exception):
            server.cleanup()
        shutil.rmtree(directory, ignore_errors=True)

    return Server(normalize_url(server.get_uri()), "embedded", stop)
