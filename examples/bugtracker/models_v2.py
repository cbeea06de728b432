"""The schema as v2 of the bug tracker maps it: root causes are rows of a curated table.

v2 never maps bug.root_cause: during the plan the sync trigger fills it for v1 readers, and
the contract phase drops it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Identity, Text, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    """v2's own metadata, separate from v1's."""


class RootCause(Base):
    """A curated root cause, one row per distinct name."""

    __tablename__ = "root_cause"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)


class Bug(Base):
    """A bug pointing at its root cause by id."""

    __tablename__ = "bug"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    bug_tracker_url: Mapped[str] = mapped_column(Text, unique=True)
    root_cause_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("root_cause.id"), nullable=False
    )
    who: Mapped[str | None] = mapped_column(Text)
    when: Mapped[datetime] = mapped_column(
        "when", DateTime(timezone=True), server_default=func.now()
    )

    # Named `cause`, not `root_cause`: v2 has nothing called root_cause on a bug.
    cause: Mapped[RootCause] = relationship(lazy="raise")
