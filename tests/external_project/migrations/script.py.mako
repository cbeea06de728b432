<%!
import os
%>\
"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
% if os.environ.get("PHASEGATE_PLAN"):
from phasegate.guard import guarded
% endif
${imports if imports else ""}

# revision identifiers, used by Alembic.
revision: str = ${repr(up_revision)}
down_revision: Union[str, Sequence[str], None] = ${repr(down_revision)}
branch_labels: Union[str, Sequence[str], None] = ${repr(branch_labels)}
depends_on: Union[str, Sequence[str], None] = ${repr(depends_on)}
% if os.environ.get("PHASEGATE_PLAN"):
# phasegate tags: the plan and phase this revision belongs to
phasegate_plan = ${repr(os.environ["PHASEGATE_PLAN"])}
phasegate_phase = ${repr(os.environ.get("PHASEGATE_PHASE"))}
% endif


% if os.environ.get("PHASEGATE_PLAN"):
@guarded
% endif
def upgrade() -> None:
    """Upgrade schema."""
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    """Downgrade schema."""
    ${downgrades if downgrades else "pass"}
