"""customer-email-normalized contract: drop customer.email.

Revision ID: c0de1e7e0001
Revises: 525e7a0110a0
Create Date: 2025-03-24 10:00:00

Only once no shop 1.x instance is alive (the plan's contract gate); phasegate drops the sync
trigger first, since it reads the column.
"""

from collections.abc import Sequence

from alembic import op

from phasegate.guard import guarded

# revision identifiers, used by Alembic.
revision: str = "c0de1e7e0001"
down_revision: str | Sequence[str] | None = "525e7a0110a0"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
# phasegate tags
phasegate_plan = "customer-email-normalized"
phasegate_phase = "contract"


@guarded
def upgrade() -> None:
    op.execute("ALTER TABLE customer DROP COLUMN email")


def downgrade() -> None:
    """Re-add email, nullable and empty.

    phasegate's contract rollback refills it from email_normalized with the plan's sync.down, in
    batches (one UPDATE here would lock every row at once).
    """
    op.execute("ALTER TABLE customer ADD COLUMN email text")
