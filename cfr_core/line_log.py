"""The line's verdict log: every verdict `cfr serve` gives, in the registry's database.

One row per scored part: when, which category, which registered version and model
hash answered, the sha256 of the two input files, the score, the threshold and the
verdict. The pipeline's ``line_summary`` asset reads it back (verdict counts, score
drift against the calibration scores). A log, not a chain: rows are only appended.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import DateTime, Float, Integer, String, create_engine, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from cfr_core.errors import CFRError


class LineLogError(CFRError):
    """The verdict log cannot be written or read."""


class _Base(DeclarativeBase):
    pass


class LineVerdict(_Base):
    __tablename__ = "cfr_line_verdicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    category: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    model_hash: Mapped[str] = mapped_column(String(64))
    rgb_sha256: Mapped[str] = mapped_column(String(64))
    xyz_sha256: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    verdict: Mapped[str] = mapped_column(String(10))


@dataclass(frozen=True)
class VerdictRow:
    at: dt.datetime
    category: str
    version: int | None
    model_hash: str
    rgb_sha256: str
    xyz_sha256: str
    score: float
    threshold: float | None
    verdict: str


class LineLog:
    """Append and read verdicts; the table is created in ``engine``'s database on first use."""

    def __init__(self, engine: Engine | str):
        self.engine = create_engine(engine, future=True) if isinstance(engine, str) else engine
        try:
            _Base.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise LineLogError(f"cannot create the verdict log: {exc}") from exc

    def record(self, row: VerdictRow) -> None:
        try:
            with Session(self.engine) as s, s.begin():
                s.add(LineVerdict(**vars(row)))
        except SQLAlchemyError as exc:
            raise LineLogError(f"cannot record the verdict: {exc}") from exc

    def rows(
        self,
        category: str,
        model_hash: str | None = None,
        since: dt.datetime | None = None,
    ) -> list[VerdictRow]:
        """The category's verdicts, oldest first; only those of ``model_hash`` / after ``since``."""
        q = select(LineVerdict).where(LineVerdict.category == category).order_by(LineVerdict.id)
        if model_hash is not None:
            q = q.where(LineVerdict.model_hash == model_hash)
        if since is not None:
            q = q.where(LineVerdict.at >= since)
        with Session(self.engine) as s:
            return [
                VerdictRow(
                    r.at,
                    r.category,
                    r.version,
                    r.model_hash,
                    r.rgb_sha256,
                    r.xyz_sha256,
                    r.score,
                    r.threshold,
                    r.verdict,
                )
                for r in s.scalars(q)
            ]
