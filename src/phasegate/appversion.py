"""Helpers for the app side: tell phasegate which code version is running.

Two ways, for a SQLAlchemy app, each one line:

    engine = create_engine(url, connect_args=connect_args("bugtracker", "2.0.1"))
    reporter = report_version(engine, "bugtracker", "2.0.1")

The first names every connection `bugtracker/2.0.1`, which phasegate sees in
`pg_stat_activity` while the connection is open (no table, no grants). The second writes a
heartbeat on every new connection and every `interval` seconds, for apps whose
connections come and go, sit behind a pooler that rewrites application_name, or run
elsewhere; the row is removed when the process exits normally. Neither ever raises into
the app: a failed heartbeat is logged and retried on the next beat.

Heartbeats go through the ledger's functions `phasegate.beat` and
`phasegate.forget_heartbeat`, which stamp the server's time and the connection's role and
touch only that role's rows: the app's role needs USAGE on schema phasegate and EXECUTE on
both, nothing on the table.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
from typing import Any

import sqlalchemy as sa

from phasegate.ledger import HEARTBEAT_BEAT, HEARTBEAT_FORGET

log = logging.getLogger("phasegate.appversion")
MAX_APPLICATION_NAME = 63  # PostgreSQL truncates longer names (NAMEDATALEN - 1)


def application_name(app: str, version: str) -> str:
    name = f"{app}/{version}"
    if len(name.encode()) > MAX_APPLICATION_NAME:
        raise ValueError(
            f"application_name {name!r} is longer than {MAX_APPLICATION_NAME} bytes; "
            "PostgreSQL would cut the version off. Use a shorter app name or version"
        )
    return name


def connect_args(app: str, version: str, **extra: Any) -> dict[str, Any]:
    """`connect_args` for `create_engine` naming each connection `<app>/<version>`."""
    return {**extra, "application_name": application_name(app, version)}


def default_instance() -> str:
    """host:pid: one row per process, so every worker of a server counts on its own."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Reporter:
    """Heartbeats for one app instance; `stop()` ends them and removes the row."""

    def __init__(
        self, engine: sa.Engine, app: str, version: str, instance: str, interval: float
    ) -> None:
        self.engine = engine
        self.params = {"app": app, "version": version, "instance": instance}
        self.interval = interval
        self._stopped = threading.Event()
        # held while writing a heartbeat and while stopping: a write that started before
        # stop() commits before stop() deletes the row, and none starts after (reentrant:
        # a beat may open a connection, whose connect event writes too)
        self._writing = threading.RLock()
        self._warned = False
        self._thread = threading.Thread(
            target=self._loop, name=f"phasegate-heartbeat-{app}", daemon=True
        )

    def start(self) -> Reporter:
        # listened once and never removed: changing an engine's listeners while other
        # threads connect is not safe; a stopped reporter's listener does nothing
        sa.event.listen(self.engine, "connect", self._on_connect)
        self._thread.start()
        atexit.register(self.stop)
        return self

    def beat(self) -> bool:
        """One heartbeat now; False (and a logged warning) when it could not be written."""
        with self._writing:
            if self._stopped.is_set():
                return False
            try:
                with self.engine.begin() as connection:
                    connection.exec_driver_sql(HEARTBEAT_BEAT, self.params)
            except Exception as exc:  # never into the app
                self._warn(exc)
                return False
        return True

    def stop(self, forget: bool = True) -> None:
        """Stop beating; with `forget`, delete the row so gates stop counting us at once."""
        with self._writing:
            if self._stopped.is_set():
                return
            self._stopped.set()
        atexit.unregister(self.stop)
        if self._thread.is_alive():  # a beat in flight must not write the row back
            self._thread.join()
        if forget:
            try:
                with self.engine.begin() as connection:
                    connection.exec_driver_sql(HEARTBEAT_FORGET, self.params)
            except Exception as exc:
                self._warn(exc)

    def _on_connect(self, dbapi_connection: Any, _record: Any) -> None:
        with self._writing:
            if self._stopped.is_set():
                return
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(HEARTBEAT_BEAT, self.params)
                dbapi_connection.commit()
            except Exception as exc:
                dbapi_connection.rollback()
                self._warn(exc)
            finally:
                cursor.close()

    def _loop(self) -> None:
        while not self._stopped.wait(self.interval):
            self.beat()

    def _warn(self, exc: Exception) -> None:
        level = logging.DEBUG if self._warned else logging.WARNING
        log.log(
            level,
            "phasegate heartbeat for %s/%s failed (is the phasegate ledger there, at version 7 "
            "or later, and may this role execute phasegate.beat?): %s",
            self.params["app"],
            self.params["version"],
            str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
        )
        self._warned = True


def report_version(
    engine: sa.Engine,
    app: str,
    version: str,
    instance: str | None = None,
    interval: float = 60.0,
) -> Reporter:
    """Heartbeat now, on every new connection of `engine`, and every `interval` seconds.

    Keep `interval` well under the gate's heartbeat TTL (default 5 minutes).
    """
    reporter = Reporter(engine, app, version, instance or default_instance(), interval)
    reporter.beat()
    return reporter.start()
