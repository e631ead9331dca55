"""`cfr serve`: a warm scoring service for the line (FastAPI on uvicorn).

Each category's deployed model is loaded once and kept in memory with its extractors,
so a part costs only its own preprocessing, features and scoring. A deployment that
changes in the registry is loaded beside the live one, audited (hash chains, lineage,
files: :func:`cfr_core.audit.audit`), and swapped in only when the audit passes; until
then, and forever if it fails, the previous model answers. No request ever sees a
half-loaded or unaudited model: the swap is one assignment under a lock.

Endpoints::

    POST /v1/categories/{category}/score   multipart rgb (PNG) + xyz (TIFF) [?heatmap=true]
    GET  /v1/models                        what answers, per category (and what was refused)
    GET  /healthz                          200 when at least one model is loaded

Every verdict is recorded in the registry's database (:mod:`cfr_core.line_log`). Bad
input gets HTTP 4xx with the one-line message `cfr score` prints.
"""

import base64
import datetime as dt
import hashlib
import io
import json
import logging
import tempfile
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from cfr_core.errors import CFRError, DataError

log = logging.getLogger(__name__)

#: the largest upload the service reads, per file (a 1,600 × 1,200 float32 cloud is 23 MB)
MAX_UPLOAD_BYTES = 64 * 1024 * 1024


@dataclass
class LiveModel:
    """A loaded, audited model and the extractors it was fitted with."""

    category: str
    version: int | None
    model_hash: str
    folder: str
    model: Any
    extractors: Any
    loaded_at: str
    audit: str

    def describe(self) -> dict[str, Any]:
        cal = self.model.calibration
        return {
            "category": self.category,
            "version": self.version,
            "model_hash": self.model_hash,
            "folder": self.folder,
            "method": self.model.config.method,
            "threshold": self.model.threshold,
            "calibration": cal.sentence() if cal is not None else None,
            "loaded_at": self.loaded_at,
            "audit": self.audit,
        }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class ModelHolder:
    """The models that answer, by category; refreshed from the registry or fixed to a folder."""

    registry: Any = None  # BankRegistry, or None with a fixed model folder
    model_dir: Path | None = None
    live: dict[str, LiveModel] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)  # category -> why its new version waits
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _extractors: dict[str, Any] = field(default_factory=dict)

    def _extractors_for(self, model) -> Any:
        from cfr_core.engine.features import build_extractors

        key = json.dumps(model.config.extractors.__dict__, sort_keys=True, default=str)
        if key not in self._extractors:
            self._extractors[key] = build_extractors(model.config.extractors)
        extractors = self._extractors[key]
        got = {"rgb": extractors[0].lineage_id, "points": extractors[1].lineage_id}
        if got != model.extractor_ids:
            raise DataError(
                f"extractors {got} differ from those the model was fitted with "
                f"{model.extractor_ids}",
                None,
                "point to the same weight files or refit",
            )
        return extractors

    def _load(self, category: str, version: int | None, folder: str, audit: str) -> LiveModel:
        from cfr_core.io.artifacts import load_model, verify_model

        digest = verify_model(folder)
        model = load_model(folder, verify=False)
        extractors = self._extractors_for(model)
        return LiveModel(category, version, digest, folder, model, extractors, _now(), audit)

    def load_folder(self) -> LiveModel:
        """The fixed ``model_dir``, served under its own category (trials and tests)."""
        from cfr_core.io.artifacts import load_model

        category = load_model(self.model_dir).category
        live = self._load(category, None, str(self.model_dir), "not audited: a model folder")
        with self._lock:
            self.live = {category: live}
        return live

    def refresh(self) -> list[str]:
        """Load every deployment that differs from what answers now; swap each in only after
        its audit passes. Returns one line per change or refusal."""
        from cfr_core.audit import audit

        if self.registry is None:
            return []
        notes = []
        for category in self.registry.categories():
            try:
                record = self.registry.deployed(category)
            except CFRError as exc:
                self.refused[category] = str(exc)
                notes.append(f"{category}: registry refused: {exc}")
                continue
            current = self.live.get(category)
            if record is None:
                if current is not None:
                    notes.append(
                        f"{category}: no deployed version any more; still answering "
                        f"with version {current.version} until one is deployed"
                    )
                continue
            if current is not None and (current.version, current.model_hash) == (
                record.version,
                record.model_hash,
            ):
                continue
            try:
                report = audit(record, self.registry)
                if not report.ok:
                    failed = "; ".join(f"{w}: {d}" for w, ok, d in report.checks if not ok)
                    raise DataError(f"audit of version {record.version} failed: {failed}")
                new = self._load(
                    category,
                    record.version,
                    record.model_path,
                    f"PASSED ({len(report.checks)} checks)",
                )
                if new.model_hash != record.model_hash:
                    raise DataError(f"version {record.version}'s folder changed after its audit")
            except (CFRError, OSError, ValueError) as exc:
                self.refused[category] = f"version {record.version}: {exc}"
                keep = f"version {current.version}" if current else "nothing"
                notes.append(
                    f"{category}: version {record.version} refused ({exc}); {keep} answers"
                )
                continue
            with self._lock:
                self.live[category] = new
            self.refused.pop(category, None)
            notes.append(f"{category}: version {record.version} ({new.model_hash[:12]}) answers")
        return notes

    def get(self, category: str) -> LiveModel | None:
        with self._lock:
            return self.live.get(category)


class ServiceError(Exception):
    """An HTTP error with one line of text."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _decode_upload(data: bytes, field_name: str, filename: str, reader, suffix: str):
    """Run the CLI's reader on an upload (same checks, same messages), naming the field."""
    if not data:
        raise ServiceError(400, f"{field_name}: the upload is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        raise ServiceError(413, f"{field_name}: larger than {MAX_UPLOAD_BYTES // 2**20} MiB")
    with tempfile.TemporaryDirectory(prefix="cfr-serve-") as tmp:
        path = Path(tmp) / f"{field_name}{suffix}"
        path.write_bytes(data)
        try:
            return reader(path)
        except DataError as exc:
            text = exc.reason + (f" ({exc.fix})" if exc.fix else "")
            raise ServiceError(422, f"{field_name} ({filename or 'upload'}): {text}") from exc


def score_upload(
    holder: ModelHolder,
    category: str,
    rgb: bytes,
    rgb_name: str,
    xyz: bytes,
    xyz_name: str,
    heatmap: bool,
    line_log=None,
) -> dict[str, Any]:
    """Score one uploaded part with the category's live model; record the verdict."""
    from cfr_core.data.io import read_rgb, read_xyz
    from cfr_core.engine.score import score_arrays
    from cfr_core.line_log import VerdictRow

    live = holder.get(category)
    if live is None:
        known = ", ".join(sorted(holder.live)) or "none"
        raise ServiceError(404, f"no model answers for category {category!r} (loaded: {known})")
    rgb_arr = _decode_upload(rgb, "rgb", rgb_name, read_rgb, ".png")
    xyz_arr = _decode_upload(xyz, "xyz", xyz_name, read_xyz, ".tiff")
    try:
        result = score_arrays(
            live.model, live.extractors, rgb_arr, xyz_arr, f"xyz ({xyz_name})", gate_maps=False
        )
    except DataError as exc:
        raise ServiceError(422, str(exc)) from exc
    out = {
        "category": category,
        "version": live.version,
        "model_hash": live.model_hash,
        "score": result.score,
        "threshold": live.model.threshold,
        "verdict": result.verdict,
    }
    if line_log is not None:
        line_log.record(
            VerdictRow(
                dt.datetime.now(dt.UTC),
                category,
                live.version,
                live.model_hash,
                hashlib.sha256(rgb).hexdigest(),
                hashlib.sha256(xyz).hexdigest(),
                result.score,
                live.model.threshold,
                result.verdict,
            )
        )
    if heatmap:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(result.heatmap()).save(buf, format="PNG")
        out["heatmap_png"] = base64.b64encode(buf.getvalue()).decode()
    return out


def create_app(holder: ModelHolder, line_log=None, poll_seconds: float = 0.0) -> FastAPI:
    """The FastAPI application. With ``poll_seconds`` > 0 a background thread refreshes the
    holder from the registry that often (new deployments are audited, then swapped in)."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(poll_seconds):
            try:
                for note in holder.refresh():
                    log.warning(note)
            except Exception as exc:  # keep serving the live models whatever the registry does
                log.error(f"registry refresh failed: {exc}")

    @asynccontextmanager
    async def lifespan(app):
        thread = None
        if poll_seconds > 0 and holder.registry is not None:
            thread = threading.Thread(target=poll, name="cfr-serve-refresh", daemon=True)
            thread.start()
        yield
        stop.set()

    app = FastAPI(
        title="CFR Factory scoring service",
        description="PASS / FAIL for one part (RGB PNG + organized xyz TIFF) with the "
        "category's deployed, audited model.",
        lifespan=lifespan,
    )

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return JSONResponse(status_code=exc.status, content={"error": str(exc)})

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        text = "; ".join(parts) + " (send multipart fields rgb = the PNG, xyz = the TIFF)"
        return JSONResponse(status_code=422, content={"error": text})

    @app.get("/healthz")
    def healthz():
        ok = bool(holder.live)
        body = {"status": "ok" if ok else "no model loaded", "models": len(holder.live)}
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @app.get("/v1/models")
    def models():
        return {
            "models": [
                m.describe() for m in sorted(holder.live.values(), key=lambda m: m.category)
            ],
            "refused": holder.refused,
        }

    @app.post("/v1/categories/{category}/score")
    def score(
        category: str,
        rgb: Annotated[UploadFile, File(description="the colour image (PNG)")],
        xyz: Annotated[UploadFile, File(description="the organized point cloud (TIFF)")],
        heatmap: bool = False,
    ):
        rgb_bytes = rgb.file.read(MAX_UPLOAD_BYTES + 1)
        xyz_bytes = xyz.file.read(MAX_UPLOAD_BYTES + 1)
        return score_upload(
            holder,
            category,
            rgb_bytes,
            rgb.filename or "",
            xyz_bytes,
            xyz.filename or "",
            heatmap,
            line_log,
        )

    return app
