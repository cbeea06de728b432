"""customer-email-normalized switch: a NOT VALID check that email_normalized is set.

Revision ID: 51c4ecc00000
Revises: e21de0c0c000
Create Date: 2025-03-17 10:00:00

Instant (no scan) and binding for every new write at once; the sync trigger fills
email_normalized for 1.x writes before the check runs. The next revision validates it.
"""

from collections.abc import Sequence

from alembic import op

from phasegate.guard import guarded

# revision identifiers, used by Alembic.
revision: str = "51c4ecc00000"
down_revision: str | Sequence[str] | None = "e21de0c0c000"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None
# phasegate tags
phasegate_plan = "customer-email-normalized"
phasegate_phase = "switch"


@guarded
def upgrade() -> None:
    op.execute(
        "ALTER TABLE customer ADD CONSTRAINT customer_email_normalized_not_null "
        "CHECK (email_normalized IS NOT NULL) NOT VALID"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE customer DROP CONSTRAINT customer_email_normalized_not_null")
