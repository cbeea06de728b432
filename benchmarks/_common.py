"""What the benchmarks share: paths, the example loader, seeded templates, the phasegate CLI.

Each benchmark is a script (``python benchmarks/<name>.py``), so this file is imported as a
sibling module, not as part of a package.
"""

from __future__ import annotations

import compileall
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

import psycopg
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from phasegate import demo, provision
from phasegate.db import URL_ENV_VARS, libpq_url, mask_url

# pgserver (the embedded server) warns about this on machines without a user session.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

ROOT = Path(__file__).resolve().parents[1]
ALEMBIC_INI = ROOT / "alembic.ini"
PLAN = ROOT / "plans" / "bug_root_cause.yaml"


def note(message: str) -> None:
    """Progress for the person watching: stderr, so stdout stays the report (or the JSON)."""
    print(message, file=sys.stderr, flush=True)


def load_example(name: str) -> ModuleType:
    """A file of examples/bugtracker, loaded by path the way the demo loads it."""
    return demo.load_example(ROOT, name)


def make_template(
    server: provision.Server,
    rows: int,
    prefix: str = "bench_tpl",
    prepare: Callable[[str], None] | None = None,
) -> str:
    """A database at the revision before the plan with ``rows`` v1 bugs; returns its URL.

    ``prepare(url)`` runs after seeding (e.g. a phasegate phase), before the final
    ``VACUUM ANALYZE``, so every clone starts with fresh statistics and a set visibility map.
    """
    seed = load_example("seed")
    url = server.create_database(prefix)
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            seed.upgrade_to_before_plan(connection, str(ALEMBIC_INI), str(PLAN))
            seed.seed_bugs(connection, rows)
            connection.commit()
    finally:
        engine.dispose()
    if prepare is not None:
        prepare(url)
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return url


def compile_bytecode() -> None:
    """Compile phasegate and the example's migrations to bytecode, as an installed copy has.

    pip compiles a package's modules when it installs it; an editable install compiles
    nothing, and where PYTHONDONTWRITEBYTECODE is set (as on this project's machines) every
    timed process would compile phasegate's ~40 files from source again: ~0.1 s that no
    installed copy pays. The files land in the ignored __pycache__ directories.
    """
    for folder in (ROOT / "src" / "phasegate", ROOT / "migrations"):
        compileall.compile_dir(folder, quiet=1)


def server_version(url: str) -> str:
    """The server's version number, e.g. "15.20"."""
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]).split()[0] if row else "?"


def phasegate_argv(url: str, *args: str) -> list[str]:
    """``python -m phasegate --database-url URL --config alembic.ini ARGS...``."""
    return [
        sys.executable,
        "-m",
        "phasegate",
        "--database-url",
        url,
        "--config",
        str(ALEMBIC_INI),
        *args,
    ]


def child_env() -> dict[str, str]:
    """The environment for child processes, minus the URL variables phasegate would read."""
    return {k: v for k, v in os.environ.items() if k not in URL_ENV_VARS}


def drop_all(server: provision.Server, urls: Iterable[str]) -> None:
    """Drop the benchmark's databases, newest first; a failure is a warning, not an error."""
    for url in reversed(list(urls)):
        try:
            server.drop_database(url)
        except Exception as exc:
            note(f"warning: could not drop {mask_url(url)}: {exc}")
