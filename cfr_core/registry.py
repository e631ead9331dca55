"""The bank registry: one SQL row per deployed version, tamper-evident, plus per-category locks.

SQLAlchemy, so any URL works for the rows: SQLite under DAGSTER_HOME by default
(``sqlite:///dagster_home/registry.db``), Postgres in production
(``postgresql+psycopg2://user:pw@host/db``).

* **Versions** (``cfr_deployments``) are appended, never edited: each row stores
  the sha256 of its own content chained to the previous row's hash, so an edit
  of any column of any row breaks the chain (:meth:`BankRegistry.verify`).
* **Which version is live** is an append-only, equally chained log of deploy and
  rollback events (``cfr_deploy_events``); the ``deployed`` flag on the rows is a
  query shortcut that :meth:`~BankRegistry.verify` checks against the log. A
  rollback moves the flag and appends its event in one transaction, so the line
  never sees zero or two live banks.
* **Chain heads** (``cfr_chain_heads``) are advanced with a compare-and-set in
  the same transaction as the append, so two writers never fork a chain.
* **Category locks** serialise rebuilds of one category across processes and
  machines: a PostgreSQL session advisory lock, or an ``flock`` on a file next to
  a SQLite database. Both vanish with the process that holds them, so a killed
  run never blocks its category.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
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
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from cfr_core.errors import CFRError
from cfr_core.paths import check_name


class RegistryError(CFRError):
    """The registry cannot be reached, or a category/version does not exist."""


#: the locks a category has (see BankRegistry.category_lock)
LOCK_SCOPES = ("rebuild", "ingest")


class CategoryBusyError(RegistryError):
    """Another run holds the category's rebuild lock."""


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
    prev_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    row_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)


class DeployEvent(_Base):
    __tablename__ = "cfr_deploy_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    category: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[int] = mapped_column(Integer)
    action: Mapped[str] = mapped_column(String(20))
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    note: Mapped[str] = mapped_column(Text, default="")
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64))


class ChainHead(_Base):
    __tablename__ = "cfr_chain_heads"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    head: Mapped[str] = mapped_column(String(64))
    count: Mapped[int] = mapped_column(Integer)


class LockHolder(_Base):
    """Who holds a category lock (for the message; the lock itself lives elsewhere)."""

    __tablename__ = "cfr_category_locks"

    category: Mapped[str] = mapped_column(String(200), primary_key=True)
    holder: Mapped[str] = mapped_column(Text)
    since: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


GENESIS = "0" * 64
CHAINS = {"deployments": Deployment, "events": DeployEvent}


@dataclass(frozen=True)
class DeploymentRecord:
    """A registry row as plain data (what `cfr registry list --json` prints)."""

    category: str
    version: int
    deployed: bool
    model_path: str
    model_hash: str
    artifact_hashes: dict[str, Any]
    shot_hashes: list[dict[str, str]]
    extractor_ids: dict[str, str]
    method_config: dict[str, Any]
    metrics: dict[str, Any]
    threshold: float | None
    code_version: str
    run_id: str
    created_at: str
    note: str
    row_hash: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def _iso(moment: dt.datetime | None) -> str:
    """A timestamp as the same string whatever the database hands back (naive = UTC)."""
    if moment is None:
        return ""
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="microseconds")


def _digest(fields: dict[str, Any], prev: str) -> str:
    blob = json.dumps({**fields, "prev": prev}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _deployment_fields(row: Deployment) -> dict[str, Any]:
    """Everything a version row says, except the ``deployed`` shortcut and the chain columns."""
    return {
        "category": row.category,
        "version": row.version,
        "model_path": row.model_path,
        "model_hash": row.model_hash,
        "artifact_hashes": row.artifact_hashes,
        "shot_hashes": row.shot_hashes,
        "extractor_ids": row.extractor_ids,
        "method_config": row.method_config,
        "metrics": row.metrics,
        "threshold": None if row.threshold is None else repr(float(row.threshold)),
        "code_version": row.code_version,
        "run_id": row.run_id,
        "created_at": _iso(row.created_at),
        "note": row.note or "",
    }


def _event_fields(row: DeployEvent) -> dict[str, Any]:
    return {
        "category": row.category,
        "version": row.version,
        "action": row.action,
        "at": _iso(row.at),
        "note": row.note or "",
    }


_FIELDS = {"deployments": _deployment_fields, "events": _event_fields}


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
        row_hash=row.row_hash or "",
    )


def default_url(home: str | Path) -> str:
    return f"sqlite:///{Path(home).resolve() / 'registry.db'}"


class _ChainConflict(Exception):
    """Another writer advanced the chain head first: retry the transaction."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class BankRegistry:
    """Deployments of fitted banks, per category, with rollback, verification and locks."""

    def __init__(self, url: str):
        self.url = url
        try:
            if url.startswith("sqlite:///"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(url, future=True)
            _Base.metadata.create_all(self.engine)
            self._create_heads()
            self._upgrade()
        except ModuleNotFoundError as exc:
            raise RegistryError(
                f"the bank registry at {self.safe_url} needs the database driver {exc.name!r}: "
                'pip install -e ".[postgres]"'
            ) from exc
        except (SQLAlchemyError, OSError) as exc:
            raise RegistryError(f"cannot open the bank registry at {self.safe_url}: {exc}") from exc

    @property
    def safe_url(self) -> str:
        """The URL without its password (for messages and metadata)."""
        try:
            return self.engine.url.render_as_string(hide_password=True)
        except AttributeError:  # before the engine exists
            return self.url.split("@")[-1]

    # ------------------------------------------------------------------ chains

    def _create_heads(self) -> None:
        for name in CHAINS:
            try:
                with Session(self.engine) as s, s.begin():
                    if s.get(ChainHead, name) is None:
                        s.add(ChainHead(name=name, head=GENESIS, count=0))
            except IntegrityError:  # another process created it first
                pass

    def _head(self, s: Session, name: str) -> ChainHead:
        head = s.get(ChainHead, name, populate_existing=True)  # never a stale copy
        if head is None:
            raise RegistryError(f"registry {self.safe_url}: chain head {name!r} is missing")
        return head

    def _append(self, s: Session, name: str, row: Deployment | DeployEvent) -> None:
        head = self._head(s, name)
        prev = head.head
        row.prev_hash = prev
        row.row_hash = _digest(_FIELDS[name](row), prev)
        s.add(row)
        moved = s.execute(
            update(ChainHead)
            .where(ChainHead.name == name, ChainHead.head == prev)
            .values(head=row.row_hash, count=ChainHead.count + 1)
            .execution_options(synchronize_session=False)
        ).rowcount
        if moved != 1:
            raise _ChainConflict(name)

    def _transaction(self, work, attempts: int = 20):
        """Run ``work(session)`` in one transaction, retried when another writer won a chain race."""
        for attempt in range(attempts):
            try:
                with Session(self.engine, expire_on_commit=False) as s, s.begin():
                    return work(s)
            except _ChainConflict:
                time.sleep(0.05 * (attempt + 1))
            except SQLAlchemyError as exc:
                if "locked" in str(exc).lower() and attempt < attempts - 1:
                    time.sleep(0.1 * (attempt + 1))
                    continue
                raise RegistryError(f"registry {self.safe_url}: {exc}") from exc
        raise RegistryError(f"registry {self.safe_url}: too many concurrent writers, try again")

    def _upgrade(self) -> None:
        """Seal a registry written before rows were chained (adds the columns, hashes the rows)."""
        columns = {c["name"] for c in inspect(self.engine).get_columns("cfr_deployments")}
        if {"prev_hash", "row_hash"} <= columns:
            return
        with self.engine.begin() as conn:
            for col in ("prev_hash", "row_hash"):
                if col not in columns:
                    conn.execute(text(f"ALTER TABLE cfr_deployments ADD COLUMN {col} VARCHAR(64)"))

        def seal(s: Session) -> None:
            for row in list(s.scalars(select(Deployment).order_by(Deployment.id))):
                self._append(s, "deployments", row)
                if row.deployed:
                    event = DeployEvent(
                        category=row.category,
                        version=row.version,
                        action="deploy",
                        at=_now(),
                        note="recorded when the registry was sealed",
                    )
                    self._append(s, "events", event)

        self._transaction(seal)

    # ------------------------------------------------------------------ writes

    def register(
        self,
        *,
        category: str,
        model_path: str,
        model_hash: str,
        artifact_hashes: dict[str, Any],
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
        """Append a new version of ``category`` (and make it the live one when ``deploy``)."""
        check_name(category)

        def work(s: Session) -> DeploymentRecord:
            latest = s.scalar(
                select(func.max(Deployment.version)).where(Deployment.category == category)
            )
            row = Deployment(
                category=category,
                version=(latest or 0) + 1,
                deployed=False,
                model_path=model_path,
                model_hash=model_hash,
                artifact_hashes=json.loads(json.dumps(artifact_hashes)),
                shot_hashes=json.loads(json.dumps(shot_hashes)),
                extractor_ids=dict(extractor_ids),
                method_config=json.loads(json.dumps(method_config)),
                metrics=json.loads(json.dumps(metrics, default=float)),
                threshold=None if threshold is None else float(threshold),
                code_version=code_version,
                run_id=run_id,
                created_at=_now(),
                note=note,
            )
            self._append(s, "deployments", row)
            s.flush()
            if deploy:
                self._deploy(s, category, row.version, "deploy", note)
                row.deployed = True
            return _record(row)

        return self._transaction(work)

    def _deploy(self, s: Session, category: str, version: int, action: str, note: str) -> None:
        s.execute(update(Deployment).where(Deployment.category == category).values(deployed=False))
        s.execute(
            update(Deployment)
            .where(Deployment.category == category, Deployment.version == version)
            .values(deployed=True)
        )
        event = DeployEvent(category=category, version=version, action=action, at=_now(), note=note)
        self._append(s, "events", event)

    def activate(
        self, category: str, version: int, action: str = "rollback", note: str = ""
    ) -> DeploymentRecord:
        """Make ``version`` the deployed one (one transaction, logged as ``action``).

        This moves the flag only; the product's doors (`cfr registry rollback`, the
        pipeline's deployment) go through :func:`cfr_core.audit.audited_deploy`, which
        audits the version first."""
        self.get(category, version)
        self._transaction(lambda s: self._deploy(s, category, version, action, note))
        return self.get(category, version)

    def rollback(self, category: str, version: int) -> DeploymentRecord:
        """:meth:`activate` logged as a rollback (unaudited: see :meth:`activate`)."""
        return self.activate(category, version, "rollback")

    # ------------------------------------------------------------------ reads

    @contextlib.contextmanager
    def _reading(self) -> Iterator[Session]:
        """A read session; a row whose JSON or timestamp no longer parses is one clear error."""
        with Session(self.engine) as s:
            try:
                yield s
            except (ValueError, TypeError) as exc:
                raise RegistryError(
                    f"a row of the bank registry at {self.safe_url} cannot be read ({exc}); it "
                    "was edited outside CFR Factory: restore it from a backup"
                ) from exc

    def list(self, category: str | None = None) -> list[DeploymentRecord]:
        with self._reading() as s:
            q = select(Deployment).order_by(Deployment.category, Deployment.version)
            if category is not None:
                q = q.where(Deployment.category == category)
            return [_record(r) for r in s.scalars(q)]

    def categories(self) -> list[str]:
        with Session(self.engine) as s:
            return sorted(s.scalars(select(Deployment.category).distinct()))

    def deployed(self, category: str) -> DeploymentRecord | None:
        with self._reading() as s:
            rows = list(
                s.scalars(
                    select(Deployment).where(Deployment.category == category, Deployment.deployed)
                )
            )
            if len(rows) > 1:
                raise RegistryError(
                    f"{len(rows)} versions of {category!r} are marked deployed; the registry was "
                    "edited outside CFR Factory: run `cfr audit --all`"
                )
            return _record(rows[0]) if rows else None

    def get(self, category: str, version: int | None = None) -> DeploymentRecord:
        """A version of ``category``; the deployed one when ``version`` is None."""
        if version is None:
            rec = self.deployed(category)
            if rec is None:
                raise RegistryError(f"category {category!r} has no deployed version")
            return rec
        with self._reading() as s:
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

    def events(self, category: str | None = None) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            q = select(DeployEvent).order_by(DeployEvent.id)
            if category is not None:
                q = q.where(DeployEvent.category == category)
            return [{**_event_fields(e), "id": e.id} for e in s.scalars(q)]

    def verify(self) -> list[str]:
        """Every way the stored rows disagree with their chains; empty when intact."""
        problems: list[str] = []
        with Session(self.engine) as s:
            for name, table in CHAINS.items():
                prev, count = GENESIS, 0
                for row in s.scalars(select(table).order_by(table.id)):
                    what = f"{name} row {row.id} ({row.category} v{row.version})"
                    if row.prev_hash != prev:
                        problems.append(f"{what}: not chained to the row before it")
                    if row.row_hash != _digest(_FIELDS[name](row), row.prev_hash or ""):
                        problems.append(f"{what}: content differs from its recorded hash")
                    prev, count = row.row_hash or "", count + 1
                head = s.get(ChainHead, name)
                if count and (head is None or head.head != prev or head.count != count):
                    problems.append(
                        f"{name}: the chain head does not match the last row (rows removed?)"
                    )
            live: dict[str, int] = {}
            for event in s.scalars(select(DeployEvent).order_by(DeployEvent.id)):
                live[event.category] = event.version
            flagged: dict[str, list[int]] = {}
            for row in s.scalars(select(Deployment).where(Deployment.deployed)):
                flagged.setdefault(row.category, []).append(row.version)
            for category in sorted(set(live) | set(flagged)):
                if flagged.get(category, []) != ([live[category]] if category in live else []):
                    problems.append(
                        f"{category}: deployed flag on version(s) {flagged.get(category, [])} but "
                        f"the deploy log says version {live.get(category)}"
                    )
        return problems

    # ------------------------------------------------------------------ locks

    @contextlib.contextmanager
    def category_lock(
        self, category: str, holder: str, wait: float = 0.0, scope: str = "rebuild"
    ) -> Iterator[None]:
        """Hold one of ``category``'s locks for the ``with`` block.

        ``scope`` "rebuild" (a whole rebuild run) or "ingest" (writing the shot library:
        an ingest run, or the ingest step of a rebuild): the two are separate, so a new
        scan's gate check never queues behind a rebuild's training. ``holder`` says who
        holds it (run id); a second caller waits up to ``wait`` seconds, then gets
        :class:`CategoryBusyError` naming the holder. The lock dies with its process
        (advisory lock / flock), never stale.
        """
        check_name(category)
        if scope not in LOCK_SCOPES:
            raise ValueError(f"lock scope must be one of {LOCK_SCOPES}, got {scope!r}")
        # "+" is never part of a category name: the ingest lock cannot be another category's
        lock_id = category if scope == "rebuild" else f"{category}+{scope}"
        who = f"{holder} (pid {os.getpid()} on {socket.gethostname()})"
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            lock = self._pg_lock(lock_id, wait)
        elif dialect == "sqlite":
            lock = self._file_lock(lock_id, wait)
        else:
            raise RegistryError(f"category locks need SQLite or PostgreSQL, not {dialect}")
        with lock:
            self._set_holder(lock_id, who)
            try:
                yield
            finally:
                self._set_holder(lock_id, None)

    def _busy(self, category: str, wait: float) -> CategoryBusyError:
        with Session(self.engine) as s:
            row = s.get(LockHolder, category)
        who = f"{row.holder} since {_iso(row.since)[:19]} UTC" if row else "another run"
        waited = f" (waited {wait:g} s)" if wait else ""
        name, _, scope = category.partition("+")
        doing = "is ingesting scans in" if scope == "ingest" else "is being rebuilt by"
        return CategoryBusyError(
            f"category {name!r} {doing} {who}{waited}; wait for that run to "
            "finish, or retry with a longer wait"
        )

    def _set_holder(self, category: str, who: str | None) -> None:
        with Session(self.engine) as s, s.begin():
            row = s.get(LockHolder, category)
            if who is None:
                if row is not None:
                    s.delete(row)
            elif row is None:
                s.add(LockHolder(category=category, holder=who, since=_now()))
            else:
                row.holder, row.since = who, _now()

    @contextlib.contextmanager
    def _pg_lock(self, category: str, wait: float) -> Iterator[None]:
        key = int.from_bytes(
            hashlib.sha256(f"cfr:{category}".encode()).digest()[:8], "big", signed=True
        )
        conn = self.engine.connect()
        try:
            deadline = time.monotonic() + wait
            while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                conn.rollback()
                if time.monotonic() >= deadline:
                    raise self._busy(category, wait)
                time.sleep(0.5)
            conn.commit()
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        finally:
            conn.close()

    @contextlib.contextmanager
    def _file_lock(self, category: str, wait: float) -> Iterator[None]:
        import fcntl

        database = self.engine.url.database
        if not database or database == ":memory:":
            raise RegistryError("category locks need a SQLite file, not an in-memory database")
        path = Path(database).resolve().parent / "locks" / f"{category}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as handle:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise self._busy(category, wait) from None
                    time.sleep(0.5)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
