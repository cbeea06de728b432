"""Shared fixtures: one PostgreSQL server per test session, a fresh database per test.

The server comes from `phasegate.provision` (PHASEGATE_TEST_DATABASE_URL, else
testcontainers, else the embedded pgserver), the same module `phasegate demo` uses.
Tests that need the seeded bug tracker clone a template database seeded once per session
(CREATE DATABASE ... TEMPLATE), so each test starts from identical, independent data.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result
from hypothesis import settings
from sqlalchemy.pool import NullPool

from phasegate import demo, guard, provision
from phasegate.cli import cli

ROOT = Path(__file__).resolve().parents[1]
ALEMBIC_INI = ROOT / "alembic.ini"
PLAN = ROOT / "plans" / "bug_root_cause.yaml"
SEED_ROWS = 3000

# Property-based tests run the same examples every time by default, so a red CI run is
# reproducible and a green one means the same thing twice; PHASEGATE_HYPOTHESIS=random
# draws new examples each run (CI does one such run too) and prints how to replay a failure.
HYPOTHESIS_PROFILE = os.environ.get("PHASEGATE_HYPOTHESIS", "seeded")
settings.register_profile("seeded", derandomize=True, database=None, print_blob=True)
settings.register_profile("random", derandomize=False, database=None, print_blob=True)
settings.load_profile(HYPOTHESIS_PROFILE)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reaches a server through a fixture (the session's, or one it starts
    for itself) is a `db` test, marked or not, so `pytest -m "not db"` runs the unit
    subset with no database and no server binaries at all."""
    servers = {"pg_server", "private_server", "primary_url"}
    for item in items:
        if servers & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.db)


def load_example(name: str) -> ModuleType:
    """A file of examples/bugtracker, loaded by path the way the demo loads it."""
    return demo.load_example(ROOT, name)


@contextmanager
def guard_off() -> Iterator[None]:
    """`PHASEGATE_GUARD=off`: plan revisions run outside phasegate (an operator's
    out-of-band `alembic upgrade`, simulated on purpose)."""
    previous = os.environ.get(guard.ESCAPE)
    os.environ[guard.ESCAPE] = "off"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[guard.ESCAPE]
        else:
            os.environ[guard.ESCAPE] = previous


@pytest.fixture(scope="session")
def pg_server() -> Iterator[provision.Server]:
    server = provision.start()
    yield server
    server.close()


@pytest.fixture
def database_url(pg_server: provision.Server) -> Iterator[str]:
    """A fresh, empty database for one test."""
    url = pg_server.create_database("pgtest")
    yield url
    pg_server.drop_database(url)


@pytest.fixture(scope="session")
def seeded_template(pg_server: provision.Server) -> Iterator[str]:
    """A database at the revision before the plan with SEED_ROWS v1 bugs, used as template."""
    seed = load_example("seed")
    url = pg_server.create_database("pgtemplate")
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.connect() as connection:
        seed.upgrade_to_before_plan(connection, str(ALEMBIC_INI), str(PLAN))
        seed.seed_bugs(connection, SEED_ROWS)
        connection.commit()
    engine.dispose()
    yield sa.engine.make_url(url).database
    pg_server.drop_database(url)


@pytest.fixture
def seeded_url(pg_server: provision.Server, seeded_template: str) -> Iterator[str]:
    """A fresh copy of the seeded bug tracker for one test."""
    url = pg_server.create_database("pgtest", template=seeded_template)
    yield url
    pg_server.drop_database(url)


@pytest.fixture
def engine(seeded_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(seeded_url, poolclass=NullPool)
    yield engine
    engine.dispose()


class Phasegate:
    """Runs the real CLI in-process (click's CliRunner) against one database."""

    def __init__(self, url: str, config: Path = ALEMBIC_INI) -> None:
        self.url = url
        self.config = config

    def __call__(self, *args: str, json_output: bool = False) -> Result:
        base = ["--database-url", self.url, "--config", str(self.config)]
        if json_output:
            base.append("--json")
        unset = {"PHASEGATE_DATABASE_URL": None, "DATABASE_URL": None}
        return CliRunner().invoke(cli, [*base, *args], env=unset, catch_exceptions=False)


@pytest.fixture
def phasegate(seeded_url: str) -> Phasegate:
    return Phasegate(seeded_url)


def on_a_terminal(url: str, *args: str, answer: str | None = None) -> tuple[int, str]:
    """The real CLI in a child process whose stdin, stdout and stderr are a pseudo-terminal,
    as an operator runs it: a progress bar instead of log lines, and a confirmation before
    it changes anything, answered with `answer`. The URL comes from PHASEGATE_DATABASE_URL.
    Returns the exit code and what the terminal showed, without its ANSI sequences."""
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env.update(PHASEGATE_DATABASE_URL=url, COLUMNS="120", TERM="xterm")
    process = subprocess.Popen(
        [sys.executable, "-m", "phasegate", "--config", str(ALEMBIC_INI), *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        cwd=ROOT,
        env=env,
    )
    os.close(follower)
    shown, asked = bytearray(), False
    deadline = time.monotonic() + 300  # a safety net for a child that hangs, not a measure
    try:
        while time.monotonic() < deadline:
            if not select.select([leader], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
            if answer is not None and not asked and b"[y/N]" in shown:
                os.write(leader, answer.encode() + b"\n")
                asked = True
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
