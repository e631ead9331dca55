"""The bank registry: one SQL row per deployment, and which one is live per category.

SQLAlchemy, so any URL works: SQLite under DAGSTER_HOME by default
(``sqlite:///dagster_home/registry.db``), Postgres in production
(``postgresql+psycopg2://user:pw@host/db``). Exactly one row per category is
``deployed``; a rollback moves that flag to an earlier version in one
transaction, so the line never sees zero or two live banks.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    func,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from cfr_core.errors import CFRError


class RegistryError(CFRError):
    """The registry cannot be reached, or a category/version does not exist."""


class _Base(DeclarativeBase):
    pass


class Deployment(_Base):
    __tablename__ = "cfr_deployments"
    __table_args__ = (UniqueConstraint("category", "version", name="uq_category_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    category: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)
    deployed: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    model_path: Mapped[str] = mapped_column(Text)
    model_hash: Mapped[str] = mapped_column(String(64))
    artifact_hashes: Mapped[dict] = mapped_column(JSON)
    shot_hashes: Mapped[list] = mapped_column(JSON)
    extractor_ids: Mapped[dict] = mapped_column(JSON)
    method_config: Mapped[dict] = mapped_column(JSON)
    metrics: Mapped[dict] = mapped_column(JSON)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    code_version: Mapped[str] = mapped_column(String(100))
    run_id: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    note: Mapped[str] = mapped_column(Text, default="")


@dataclass(frozen=True)
class DeploymentRecord:
    """A registry row as plain data (what `cfr registry list --json` prints)."""

    category: str
    version: int
    deployed: bool
    model_path: str
    model_hash: str
    artifact_hashes: dict[str, str]
    shot_hashes: list[dict[str, str]]
    extractor_ids: dict[str, str]
    method_config: dict[str, Any]
    metrics: dict[str, Any]
    threshold: float | None
    code_version: str
    run_id: str
    created_at: str
    note: str

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def _record(row: Deployment) -> DeploymentRecord:
    return DeploymentRecord(
        category=row.category,
        version=row.version,
        deployed=row.deployed,
        model_path=row.model_path,
        model_hash=row.model_hash,
        artifact_hashes=row.artifact_hashes,
        shot_hashes=row.shot_hashes,
        extractor_ids=row.extractor_ids,
        method_config=row.method_config,
        metrics=row.metrics,
        threshold=row.threshold,
        code_version=row.code_version,
        run_id=row.run_id,
        created_at=row.created_at.isoformat() if row.created_at else "",
        note=row.note or "",
    )


def default_url(home: str | Path) -> str:
    return f"sqlite:///{Path(home).resolve() / 'registry.db'}"


class BankRegistry:
    """Deployments of fitted banks, per category, with rollback."""

    def __init__(self, url: str):
        self.url = url
        try:
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(url, future=True)
            _Base.metadata.create_all(self.engine)
        except (SQLAlchemyError, OSError) as exc:
            raise RegistryError(f"cannot open the bank registry at {url!r}: {exc}") from exc

    def register(
        self,
        *,
        category: str,
        model_path: str,
        model_hash: str,
        artifact_hashes: dict[str, str],
        shot_hashes: list[dict[str, str]],
        extractor_ids: dict[str, str],
        method_config: dict[str, Any],
        metrics: dict[str, Any],
        threshold: float | None,
        code_version: str,
        run_id: str,
        deploy: bool = True,
        note: str = "",
    ) -> DeploymentRecord:
        """Add a new version of ``category`` (and make it the live one when ``deploy``)."""
        with Session(self.engine) as s, s.begin():
            latest = s.scalar(
                select(func.max(Deployment.version)).where(Deployment.category == category)
            )
            if deploy:
                s.execute(
                    update(Deployment).where(Deployment.category == category).values(deployed=False)
                )
            row = Deployment(
                category=category,
                version=(latest or 0) + 1,
                deployed=deploy,
                model_path=model_path,
                model_hash=model_hash,
                artifact_hashes=artifact_hashes,
                shot_hashes=shot_hashes,
                extractor_ids=extractor_ids,
                method_config=method_config,
                metrics=json.loads(json.dumps(metrics, default=float)),
                threshold=threshold,
                code_version=code_version,
                run_id=run_id,
                created_at=dt.datetime.now(dt.UTC),
                note=note,
            )
            s.add(row)
            s.flush()
            return _record(row)

    def list(self, category: str | None = None) -> list[DeploymentRecord]:
        with Session(self.engine) as s:
            q = select(Deployment).order_by(Deployment.category, Deployment.version)
            if category is not None:
                q = q.where(Deployment.category == category)
            return [_record(r) for r in s.scalars(q)]

    def deployed(self, category: str) -> DeploymentRecord | None:
        with Session(self.engine) as s:
            row = s.scalar(
                select(Deployment).where(Deployment.category == category, Deployment.deployed)
            )
            return _record(row) if row else None

    def get(self, category: str, version: int | None = None) -> DeploymentRecord:
        """A version of ``category``; the deployed one when ``version`` is None."""
        if version is None:
            rec = self.deployed(category)
            if rec is None:
                raise RegistryError(f"category {category!r} has no deployed version")
            return rec
        with Session(self.engine) as s:
            row = s.scalar(
                select(Deployment).where(
                    Deployment.category == category, Deployment.version == version
                )
            )
            if row is None:
                known = [r.version for r in self.list(category)]
                raise RegistryError(
                    f"category {category!r} has no version {version} (known: {known or 'none'})"
                )
            return _record(row)

    def rollback(self, category: str, version: int) -> DeploymentRecord:
        """Make ``version`` the deployed one (one transaction)."""
        self.get(category, version)
        with Session(self.engine) as s, s.begin():
            s.execute(
                update(Deployment).where(Deployment.category == category).values(deployed=False)
            )
            s.execute(
                update(Deployment)
                .where(Deployment.category == category, Deployment.version == version)
                .values(deployed=True)
            )
        return self.get(category, version)
