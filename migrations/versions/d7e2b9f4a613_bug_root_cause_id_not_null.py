"""bug-root-cause switch: bug.root_cause_id NOT NULL; bug.root_cause becomes optional.

Revision ID: d7e2b9f4a613
Revises: a41c7e9d2b58
Create Date: 2025-01-20 09:05:00

SET NOT NULL would scan bug under ACCESS EXCLUSIVE; with a validated CHECK (col IS NOT NULL)
in place PostgreSQL 12+ skips that scan, so the long scan happens in VALIDATE CONSTRAINT, which
does not block writers. root_cause loses NOT NULL so v2 code may stop writing it.
"""

from collections.abc import Sequence

from alembic import op

from phasegate.guard import guarded

# revision identifiers, used by Alembic.
revision: str = "d7e2b9f4a613"
down_revision: str | Sequence[str] | None = "a41c7e9d2b58"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
# phasegate tags
phasegate_plan: str | None = "bug-root-cause"
phasegate_phase: str | None = "switch"


@guarded
def upgrade() -> None:
    """Turn the validated check into NOT NULL, then relax the old column."""
    op.execute("ALTER TABLE bug VALIDATE CONSTRAINT bug_root_cause_id_not_null")
    op.execute("ALTER TABLE bug ALTER COLUMN root_cause_id SET NOT NULL")
    op.execute("ALTER TABLE bug DROP CONSTRAINT bug_root_cause_id_not_null")
    op.execute("ALTER TABLE bug ALTER COLUMN root_cause DROP NOT NULL")


def downgrade() -> None:
    """Undo in reverse, making root_cause NOT NULL again the same scan-free way."""
    op.execute("ALTER TABLE bug ALTER COLUMN root_cause_id DROP NOT NULL")
    # The previous revision's downgrade drops this check: it must find it.
    op.execute(
        "ALTER TABLE bug ADD CONSTRAINT bug_root_cause_id_not_null "
        "CHECK (root_cause_id IS NOT NULL) NOT VALID"
    )
    op.execute(
        "ALTER TABLE bug ADD CONSTRAINT bug_root_cause_not_null "
        "CHECK (root_cause IS NOT NULL) NOT VALID"
    )
    op.execute("ALTER TABLE bug VALIDATE CONSTRAINT bug_root_cause_not_null")
    op.execute("ALTER TABLE bug ALTER COLUMN root_cause SET NOT NULL")
    op.execute("ALTER TABLE bug DROP CONSTRAINT bug_root_cause_not_null")
