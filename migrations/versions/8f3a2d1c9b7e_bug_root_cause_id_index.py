"""bug-root-cause expand: index bug.root_cause_id, built CONCURRENTLY.

Revision ID: 8f3a2d1c9b7e
Revises: 6c55e0560fd4
Create Date: 2025-01-13 09:05:00

CREATE INDEX CONCURRENTLY cannot run in a transaction, hence autocommit_block(). A concurrent
build that failed (lock timeout, cancel) leaves an INVALID index behind that IF NOT EXISTS would
happily keep; so a retry drops such a leftover first. The index serves the FK (deletes from
root_cause) and v2's lookups by root cause.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op

from phasegate.guard import guarded

# revision identifiers, used by Alembic.
revision: str = "8f3a2d1c9b7e"
down_revision: str | Sequence[str] | None = "6c55e0560fd4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
# phasegate tags
phasegate_plan: str | None = "bug-root-cause"
phasegate_phase: str | None = "expand"

INDEX_IS_INVALID = sa.text(
    """
    SELECT NOT i.indisvalid
    FROM pg_index AS i
    WHERE i.indexrelid = to_regclass('ix_bug_root_cause_id')
    """
)


@guarded
def upgrade() -> None:
    """Drop an INVALID leftover of a failed build, then build the index without blocking writes."""
    with op.get_context().autocommit_block():
        # Offline (--sql) there is no database to ask; the script builds with IF NOT EXISTS only.
        if not context.is_offline_mode() and op.get_bind().execute(INDEX_IS_INVALID).scalar():
            op.execute("DROP INDEX CONCURRENTLY ix_bug_root_cause_id")
        op.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_bug_root_cause_id ON bug (root_cause_id)"
        )


def downgrade() -> None:
    """Drop the index without blocking writes."""
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_bug_root_cause_id")
