"""Backing off on replica lag, against a real streaming replica.

A primary and a standby of our own (initdb, pg_basebackup -R) on free ports, built from the
binaries of the machine's PostgreSQL or of the embedded server. The standby applies WAL
`recovery_min_apply_delay` late, so every write the walk makes shows up as replay lag in
the primary's pg_stat_replication: a walk with a lower --max-replica-lag must pause.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from .conftest import Phasegate
from .test_backfill_engine import assert_all_agree, execute, fetch, make_plan

APPLY_DELAY = "2s"
ROWS = 2000
TOOLS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")


def bindir() -> Path:
    """A directory with initdb, pg_ctl and pg_basebackup: pg_config's, else pgserver's."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(Path(out.stdout.strip()))
    try:
        from pgserver._commands import POSTGRES_BIN_PATH

        candidates.append(Path(POSTGRES_BIN_PATH))
    except ImportError:
        pass
    for candidate in candidates:
        if all((candidate / tool).exists() for tool in TOOLS):
            return candidate
    raise RuntimeError(f"no PostgreSQL binaries ({', '.join(TOOLS)}) among {candidates}")


def server_user() -> str | None:
    """The OS user to run the servers as when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver"):
        try:
            return pwd.getpwnam(name).pw_name
        except KeyError:
            continue
    from pgserver.utils import ensure_user_exists

    return ensure_user_exists("pgserver").pw_name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Runs the PostgreSQL tools, as the server user when we are root."""

    def __init__(self) -> None:
        self.bin = bindir()
        self.user = server_user()
        if self.user and "pgserver" in self.bin.parts:
            # as pgserver does before it runs its binaries as another user
            from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions

            ensure_prefix_permissions(self.bin)
            ensure_folder_permissions(self.bin, 0o055)
            ensure_folder_permissions(self.bin.parent / "lib", 0o044)
        self.root = Path(tempfile.mkdtemp(prefix="phasegate-replica-"))
        if self.user:
            shutil.chown(self.root, self.user)
        self.started: list[Path] = []

    def run(self, tool: str, *args: str) -> None:
        argv = [str(self.bin / tool), *args]
        if self.user:
            argv = ["runuser", "-u", self.user, "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=self.root, timeout=120)
        assert done.returncode == 0, f"{tool} failed: {done.stderr}"

    def start(self, name: str, port: int) -> None:
        options = f"-p {port} -k {self.root} -c listen_addresses=127.0.0.1"
        data = self.root / name
        self.run("pg_ctl", "-D", str(data), "-o", options, "-l", f"{data}.log", "-w", "start")
        self.started.append(data)

    def stop(self) -> None:
        for data in reversed(self.started):
            subprocess.run(
                [
                    *(["runuser", "-u", self.user, "--"] if self.user else []),
                    str(self.bin / "pg_ctl"),
                    "-D",
                    str(data),
                    "-m",
                    "immediate",
                    "stop",
                ],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def primary_url() -> Iterator[str]:
    with replicated_primary() as url:
        yield url


@contextmanager
def replicated_primary() -> Iterator[str]:
    """A primary whose one streaming standby replays every commit APPLY_DELAY late."""
    cluster = Cluster()
    primary, standby = free_port(), free_port()
    try:
        cluster.run("initdb", "-D", str(cluster.root / "primary"), "-A", "trust", "-U", "postgres")
        cluster.start("primary", primary)
        cluster.run(
            "pg_basebackup",
            *("-h", "127.0.0.1", "-p", str(primary), "-U", "postgres"),
            *("-D", str(cluster.root / "standby"), "-R"),
        )
        with open(cluster.root / "standby" / "postgresql.auto.conf", "a") as conf:
            # a short status interval: the primary forgets a caught-up standby's lag sooner
            conf.write(f"recovery_min_apply_delay = '{APPLY_DELAY}'\n")
            conf.write("wal_receiver_status_interval = '1s'\n")
        cluster.start("standby", standby)
        url = f"postgresql://postgres@127.0.0.1:{primary}/postgres"
        deadline = time.monotonic() + 30
        while fetch(url, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") != [
            (1,)
        ]:
            assert time.monotonic() < deadline, "the standby never started streaming"
            time.sleep(0.2)
        yield url
    finally:
        cluster.stop()


def fresh_database(url: str, name: str, owner: str = "postgres") -> str:
    execute(url, f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name} OWNER {owner}")
    return url.rsplit("/", 1)[0] + f"/{name}"


def seed(url: str) -> None:
    execute(
        url,
        "CREATE TABLE t (k bigint PRIMARY KEY, val int NOT NULL, doubled int)",
        f"INSERT INTO t SELECT g, g FROM generate_series(1, {ROWS}) g",
    )


FLAGS = ("--batch-size", "50", "--pause", "0.05")


def test_the_walk_pauses_while_the_replica_lags(primary_url: str, tmp_path: Path) -> None:
    url = fresh_database(primary_url, "lagging")
    seed(url)
    plan = make_plan(tmp_path)
    result = Phasegate(url)(
        "backfill", plan, "--live-version", "1", "--yes", "--max-replica-lag", "0.5", *FLAGS
    )
    assert result.exit_code == 0, result.output
    assert "replica replay lag" in result.stderr and "> 0.5s: pausing" in result.stderr
    assert_all_agree(url, ROWS)


def test_a_role_that_cannot_see_the_lag_is_told_so(primary_url: str, tmp_path: Path) -> None:
    """Without pg_read_all_stats, pg_stat_replication hides the lag (NULL, as if there were
    no replica): the walk says so once instead of silently never backing off."""
    execute(primary_url, "DROP ROLE IF EXISTS walker", "CREATE ROLE walker LOGIN")
    url = fresh_database(primary_url, "hidden", owner="walker")
    as_walker = url.replace("postgres@", "walker@")
    seed(as_walker)
    with psycopg.connect(as_walker) as conn:
        [(state,)] = conn.execute("SELECT state FROM pg_stat_replication").fetchall()
    assert state is None  # the row is there, its details are not
    plan = make_plan(tmp_path)
    result = Phasegate(as_walker)(
        "backfill", plan, "--live-version", "1", "--yes", "--max-replica-lag", "0.5", *FLAGS
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.count("replica replay lag is hidden from role walker") == 1
    assert "GRANT pg_read_all_stats (or pg_monitor) TO walker" in result.stderr
    assert "pausing" not in result.stderr
    assert_all_agree(as_walker, ROWS)
