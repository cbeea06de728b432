<%!
import os
%>\
<%
    plan = context.get("phasegate_plan") or os.environ.get("PHASEGATE_PLAN") or None
    phase = context.get("phasegate_phase") or os.environ.get("PHASEGATE_PHASE") or None
%>\
"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

"""

from collections.abc import Sequence

import sqlalchemy as sa  # noqa: F401
from alembic import op
% if plan:

from phasegate.guard import guarded
% endif
${imports if imports else ""}

# revision identifiers, used by Alembic.
revision: str = ${repr(up_revision)}
down_revision: str | Sequence[str] | None = ${repr(down_revision)}
branch_labels: str | Sequence[str] | None = ${repr(branch_labels)}
depends_on: str | Sequence[str] | None = ${repr(depends_on)}
# phasegate tags: the plan and phase this revision belongs to (None = not part of a plan).
phasegate_plan: str | None = ${repr(plan)}
phasegate_phase: str | None = ${repr(phase)}


% if plan:
@guarded  # runs outside phasegate only once phasegate has run this phase (phasegate.guard)
% endif
def upgrade() -> None:
    """Upgrade schema."""
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    """Downgrade schema."""
    ${downgrades if downgrades else "pass"}
