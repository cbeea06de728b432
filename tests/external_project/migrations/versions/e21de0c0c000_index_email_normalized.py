"""customer-email-normalized expand: index email_normalized, built CONCURRENTLY.

Revision ID: e21de0c0c000
Revises: e1add0c01000
Create Date: 2025-03-10 10:05:00

CREATE INDEX CONCURRENTLY cannot run inside a transaction, hence autocommit_block().
"""

from collections.abc import Sequence

from alembic import op

from phasegate.guard import guarded

# revision identifiers, used by Alembic.
revision: str = "e21de0c0c000"
down_revision: str | Sequence[str] | None = "e1add0c01000"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
# phasegate tags
phasegate_plan = "customer-email-normalized"
phasegate_phase = "expand"


@guarded
def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_customer_email_normalized "
            "ON customer (email_normalized)"
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute("DROP INDEX CONCURRENTLY IF EXISTS ix_customer_email_normalized")
