"""customer-email-normalized expand: add a nullable customer.email_normalized.

Revision ID: e1add0c01000
Revises: ba5e11de0001
Create Date: 2025-03-10 10:00:00

Nullable and without a default: a catalog-only change, and shop 1.x (which never writes the
column) keeps working.
"""

from collections.abc import Sequence

from alembic import op

from phasegate.guard import guarded

# revision identifiers, used by Alembic.
revision: str = "e1add0c01000"
down_revision: str | Sequence[str] | None = "ba5e11de0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
# phasegate tags
phasegate_plan = "customer-email-normalized"
phasegate_phase = "expand"


@guarded
def upgrade() -> None:
    op.execute("ALTER TABLE customer ADD COLUMN email_normalized text")


def downgrade() -> None:
    op.execute("ALTER TABLE customer DROP COLUMN email_normalized")
