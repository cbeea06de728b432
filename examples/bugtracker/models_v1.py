"""The bug table as v1 of the bug tracker maps it: the root cause is free text.

v1 knows nothing of root_cause / root_cause_id; the sync trigger fills those for its writes
while the bug-root-cause plan runs.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Identity, Text, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """v1's own metadata, separate from v2's (two code versions, two mappings of one table)."""


class Bug(Base):
    """A bug with its root cause as written text, e.g. "race condition"."""

    __tablename__ = "bug"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    bug_tracker_url: Mapped[str] = mapped_column(Text, unique=True)
    root_cause: Mapped[str] = mapped_column(Text)
    who: Mapped[str | None] = mapped_column(Text)
    when: Mapped[datetime] = mapped_column(
        "when", DateTime(timezone=True), server_default=func.now()
    )
