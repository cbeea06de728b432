"""bug-root-cause switch: validate the FK, add a NOT VALID check that root_cause_id is set.

Revision ID: a41c7e9d2b58
Revises: 8f3a2d1c9b7e
Create Date: 2025-01-20 09:00:00

VALIDATE CONSTRAINT scans bug under SHARE UPDATE EXCLUSIVE, which lets reads and writes go on.
The CHECK ... NOT VALID is instant and binds new writes at once (the sync trigger fills
root_cause_id for v1 writes before the check runs); the next revision validates it.
"""

from collections.abc import Sequence

from alembic import op

from phasegate.guard import guarded

# revision identifiers, used by Alembic.
revision: str = "a41c7e9d2b58"
down_revision: str | Sequence[str] | None = "8f3a2d1c9b7e"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
# phasegate tags
phasegate_plan: str | None = "bug-root-cause"
phasegate_phase: str | None = "switch"


@guarded
def upgrade() -> None:
    """Validate the foreign key; start enforcing root_cause_id IS NOT NULL for new rows."""
    op.execute("ALTER TABLE bug VALIDATE CONSTRAINT bug_root_cause_id_fkey")
    op.execute(
        "ALTER TABLE bug ADD CONSTRAINT bug_root_cause_id_not_null "
        "CHECK (root_cause_id IS NOT NULL) NOT VALID"
    )


def downgrade() -> None:
    """Drop the check only.

    The foreign key stays validated: PostgreSQL cannot mark a constraint NOT VALID again short
    of dropping and re-adding it, and a validated FK is harmless, it only says the data is right.
    The expand revision's downgrade drops it anyway.
    """
    op.execute("ALTER TABLE bug DROP CONSTRAINT bug_root_cause_id_not_null")
