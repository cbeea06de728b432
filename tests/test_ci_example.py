"""examples/ci: the deploy pipeline as a shell script, run for real, and its GitHub twin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import psycopg
import yaml

from phasegate.db import libpq_url

from .conftest import ROOT, Phasegate

SCRIPT = ROOT / "examples" / "ci" / "deploy.sh"
WORKFLOW = ROOT / "examples" / "ci" / "github-actions.yml"
ORDER = ["upgrade", "expand", "backfill", "check-deploy", "switch", "gate", "contract"]


def run_script(url: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "PHASEGATE_DATABASE_URL": url,
        "PHASEGATE": f"{sys.executable} -m phasegate",
        "CURRENT_VERSION": "1.4",
        "NEW_VERSION": "2.0",
        "DEPLOY_COMMAND": "echo rolled out",
        **env,
    }
    environment.pop("DATABASE_URL", None)
    return subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def plan_status(url: str) -> dict:
    result = Phasegate(url)("status", str(ROOT / "plans" / "bug_root_cause.yaml"), json_output=True)
    return json.loads(result.stdout)


def test_the_pipeline_waits_for_v1_to_drain_then_contracts(seeded_url) -> None:
    v1 = psycopg.connect(libpq_url(seeded_url), application_name="bugtracker/1.4")
    # v1 drains once the script waits at the contract gate (its connection is named)
    drained = threading.Event()

    def drain_while_the_gate_waits() -> None:
        with psycopg.connect(libpq_url(seeded_url), autocommit=True) as probe:
            while not drained.wait(0.3):
                waiting = probe.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name LIKE 'phasegate gate%'"
                ).fetchone()[0]
                if waiting:
                    drained.wait(1.5)  # a poll or two sees v1 still there
                    v1.close()
                    drained.set()

    watcher = threading.Thread(target=drain_while_the_gate_waits)
    watcher.start()
    try:
        result = run_script(seeded_url, GATE_WAIT="2m")
    finally:
        drained.set()
        watcher.join()
        v1.close()
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("==> ")]
    assert steps[0].startswith("==> upgrade") and steps[4] == "==> deploy 2.0"
    assert steps[-1].startswith("==> done")
    # the deploy's upgrade leaves the plan's revisions to the phase steps that follow
    assert "nothing to apply" in result.stdout and "left for phasegate:" in result.stdout
    assert "waiting" in result.stderr and "1.4 (pg_stat_activity" in result.stderr
    status = plan_status(seeded_url)
    assert (status["phase"], status["state"]) == ("contract", "done")


def test_the_pipeline_stops_before_contract_while_v1_stays(seeded_url) -> None:
    v1 = psycopg.connect(libpq_url(seeded_url), application_name="bugtracker/1.4")
    try:
        result = run_script(seeded_url, GATE_WAIT="2s")
    finally:
        v1.close()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "deploy stopped: 'wait until no old version is live (up to 2s)' was refused" in (
        result.stderr
    )
    assert plan_status(seeded_url)["phase"] == "switch"


def test_the_pipeline_refuses_a_version_the_schema_cannot_take(seeded_url) -> None:
    result = run_script(seeded_url, NEW_VERSION="3.0")
    assert result.returncode == 1
    assert "may NOT be deployed" in result.stdout and "rolled out" not in result.stdout
    assert plan_status(seeded_url)["phase"] == "backfill"


def test_the_github_workflow_runs_the_same_steps_in_the_same_order() -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    runs = [s.get("run", "") for s in workflow["jobs"]["deploy"]["steps"]]
    commands = [r.split()[1] for r in runs if r.startswith("phasegate ")]
    assert commands == ORDER
    script_steps = [
        line.split()[0]
        for line in SCRIPT.read_text().splitlines()
        if line.startswith("  ") and line.split()[0] in ORDER
    ]
    assert script_steps == ORDER
