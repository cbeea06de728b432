"""customer-email-normalized switch: email_normalized NOT NULL; email becomes optional.

Revision ID: 525e7a0110a0
Revises: 51c4ecc00000
Create Date: 2025-03-17 10:05:00

VALIDATE scans under SHARE UPDATE EXCLUSIVE (writers go on); with the validated check in place,
SET NOT NULL skips its own scan (PostgreSQL 12+). email drops NOT NULL so shop 2.x may stop
writing it (the sync trigger still fills it while 1.x runs).
"""

from collections.abc import Sequence

from alembic import op

from phasegate.guard import guarded

# revision identifiers, used by Alembic.
revision: str = "525e7a0110a0"
down_revision: str | Sequence[str] | None = "51c4ecc00000"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
# phasegate tags
phasegate_plan = "customer-email-normalized"
phasegate_phase = "switch"


@guarded
def upgrade() -> None:
    op.execute("ALTER TABLE customer VALIDATE CONSTRAINT customer_email_normalized_not_null")
    op.execute("ALTER TABLE customer ALTER COLUMN email_normalized SET NOT NULL")
    op.execute("ALTER TABLE customer DROP CONSTRAINT customer_email_normalized_not_null")
    op.execute("ALTER TABLE customer ALTER COLUMN email DROP NOT NULL")


def downgrade() -> None:
    """Reverse order; email gets NOT NULL back the same scan-free way."""
    op.execute("ALTER TABLE customer ALTER COLUMN email_normalized DROP NOT NULL")
    # The previous revision's downgrade drops this check: it must find it.
    op.execute(
        "ALTER TABLE customer ADD CONSTRAINT customer_email_normalized_not_null "
        "CHECK (email_normalized IS NOT NULL) NOT VALID"
    )
    op.execute(
        "ALTER TABLE customer ADD CONSTRAINT customer_email_not_null "
        "CHECK (email IS NOT NULL) NOT VALID"
    )
    op.execute("ALTER TABLE customer VALIDATE CONSTRAINT customer_email_not_null")
    op.execute("ALTER TABLE customer ALTER COLUMN email SET NOT NULL")
    op.execute("ALTER TABLE customer DROP CONSTRAINT customer_email_not_null")
