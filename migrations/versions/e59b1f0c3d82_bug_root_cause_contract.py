"""bug-root-cause contract: drop bug.root_cause and root_cause_id_for().

Revision ID: e59b1f0c3d82
Revises: d7e2b9f4a613
Create Date: 2025-01-27 09:00:00

Only once no v1 instance is alive (the plan's contract gate). phasegate drops the sync trigger
before this runs, since the trigger reads both the column and the function.
"""

from collections.abc import Sequence
from pathlib import Path

from alembic import op

from phasegate.guard import guarded

# revision identifiers, used by Alembic.
revision: str = "e59b1f0c3d82"
down_revision: str | Sequence[str] | None = "d7e2b9f4a613"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
# phasegate tags
phasegate_plan: str | None = "bug-root-cause"
phasegate_phase: str | None = "contract"

# The same file the expand revision 6c55e0560fd4 creates the function from.
ROOT_CAUSE_ID_FOR_SQL = Path(__file__).resolve().parents[1] / "sql" / "root_cause_id_for.sql"


@guarded
def upgrade() -> None:
    """Drop the old text column and the helper only the backfill and sync trigger used."""
    op.execute("ALTER TABLE bug DROP COLUMN root_cause")
    op.execute("DROP FUNCTION root_cause_id_for(text)")


def downgrade() -> None:
    """Bring back the function and an empty, nullable root_cause column.

    The column comes back NULL everywhere: phasegate's contract rollback refills it from
    root_cause_id with the plan's sync.down expression in batches, before the switch revisions'
    downgrade makes it NOT NULL again (one big UPDATE here would lock every row at once).
    """
    op.execute(ROOT_CAUSE_ID_FOR_SQL.read_text(encoding="utf-8"))
    op.execute("ALTER TABLE bug ADD COLUMN root_cause text")
