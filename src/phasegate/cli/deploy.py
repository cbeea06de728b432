"""`phasegate upgrade`: the deploy's `alembic upgrade head`, minus what phasegate must run."""

from __future__ import annotations

from typing import Any

import click

from phasegate import db, upgrade
from phasegate.cli.app import Context, actor, cli, emit, handle_errors, log
from phasegate.cli.phases import GatedArgs, _confirm, _lock_policy, lock_options
from phasegate.errors import EXIT_OK
from phasegate.plan import load_plan
from phasegate.revisions import AlembicProject


@cli.command("upgrade")
@lock_options
@click.pass_obj
@handle_errors
def upgrade_command(ctx: Context, **kw: Any) -> int:
    """Apply every Alembic revision that is safe now; leave the plans' phases to phasegate.

    What a deploy script (or a container's start) runs instead of `alembic upgrade head`.
    It applies, on every branch, each revision up to the first one of a plan's phase
    that phasegate has not run here (not started, or running or failed part way), and
    names each such plan, phase and the command that runs it. Revisions of phases
    already done run (e.g. restoring ones downgraded by hand). The plans are the files
    in the plans directory (setting `plans`, default plans/ next to alembic.ini); a
    tagged revision of a plan with no file there counts as not started. Exit 0 when
    everything safe is applied, whatever is left.

    \b
    Example, in a deploy script:
      phasegate upgrade --yes
      phasegate advance plans/bug_root_cause.yaml --to backfill --live-version "$CURRENT" --yes
    """
    args = GatedArgs(live_versions=(), override_gate=None, wait=0.0, **kw)
    project = ctx.project()
    plans = [load_plan(path) for path in ctx.plan_paths()]
    for plan in plans:
        project.resolve(plan)  # an invalid plan stops here, before any connection
    url = ctx.url(project)
    with db.session(url, "phasegate upgrade (looking)") as conn:
        result = upgrade.pending(conn, project, plans)
    if result.plan.apply:  # only then the lock: a phase running elsewhere need not end first
        _confirm(args.yes, f"upgrade {db.mask_url(url)} to every revision that is safe now")
        with db.locked_session(url, "upgrade", _lock_policy(args, ctx.settings())) as conn:
            result = upgrade.run(conn, project, plans, args.actor or actor(), notify=log)
    document = {"ok": True, **result.to_dict(project)}
    emit(ctx, document, _text(project, result))
    return EXIT_OK


def _text(project: AlembicProject, result: upgrade.UpgradeResult) -> str:
    describe = {r: project.revisions[r].describe() for r in project.order}
    lines = (
        [f"applied {len(result.applied)} revision(s):"]
        + [f"  {describe[r]}" for r in result.applied]
        if result.applied
        else ["nothing to apply: every revision that is safe now is applied"]
    )
    if result.plan.left:
        lines.append("left for phasegate:")
        for entry in result.plan.left:
            lines.append(
                f"  plan {entry.plan}, phase {entry.phase} ({entry.why}): "
                f"{', '.join(entry.revisions)}; run `{entry.command}`"
            )
    if result.plan.waiting:
        lines.append(
            f"waiting behind them: {len(result.plan.waiting)} revision(s) "
            f"({', '.join(result.plan.waiting)})"
        )
    lines.append(f"alembic heads: {', '.join(result.heads) or '(none)'}")
    return "\n".join(lines)
