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
from starlette.exceptions import HTTPException as StarletteHTTPException

from cfr_core.errors import DataError

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
    _refused_keys: dict[str, tuple] = field(default_factory=dict)  # (version, hash) refused

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

    def snapshot(self) -> tuple[dict[str, LiveModel], dict[str, str]]:
        """Copies of what answers and what was refused (the poll thread changes both)."""
        with self._lock:
            return dict(self.live), dict(self.refused)

    def _refuse(self, category: str, key, why: str) -> str:
        with self._lock:
            self.refused[category] = why
            if key is not None:
                self._refused_keys[category] = key
            current = self.live.get(category)
        keep = f"version {current.version}" if current else "nothing"
        return f"{category}: {why}; {keep} answers"

    def refresh(self) -> list[str]:
        """Load every deployment that differs from what answers now; swap each in only after
        its audit passes. A refused version is not tried again until its row changes; one
        category's failure, whatever it is, never stops the others. Returns one line per
        change or refusal."""
        if self.registry is None:
            return []
        try:
            categories = self.registry.categories()
        except Exception as exc:  # the registry itself: keep answering with the live models
            return [f"the registry cannot be read ({type(exc).__name__}: {exc}); the live "
                    "models keep answering"]  # fmt: skip
        notes = []
        for category in categories:
            try:
                note = self._refresh_one(category)
            except Exception as exc:  # never let one category stop the others
                note = self._refuse(category, None, f"{type(exc).__name__}: {exc}")
            if note:
                notes.append(note)
        return notes

    def _refresh_one(self, category: str) -> str | None:
        from cfr_core.audit import audit

        record = self.registry.deployed(category)
        current = self.get(category)
        if record is None:
            return None  # a model that answers keeps answering until another is deployed
        key = (record.version, record.model_hash)
        if current is not None and (current.version, current.model_hash) == key:
            with self._lock:
                self.refused.pop(category, None)
                self._refused_keys.pop(category, None)
            return None
        if self._refused_keys.get(category) == key:
            return None  # refused already: not audited again until the row changes
        report = audit(record, self.registry)
        if not report.ok:
            failed = "; ".join(f"{w}: {d}" for w, ok, d in report.checks if not ok)
            return self._refuse(
                category, key, f"version {record.version} refused: its audit failed ({failed})"
            )
        new = self._load(
            category, record.version, record.model_path, f"PASSED ({len(report.checks)} checks)"
        )
        if new.model_hash != record.model_hash:
            return self._refuse(
                category, key, f"version {record.version} refused: its folder changed after "
                "its audit"
            )  # fmt: skip
        with self._lock:
            self.live[category] = new
            self.refused.pop(category, None)
            self._refused_keys.pop(category, None)
        return f"{category}: version {record.version} ({new.model_hash[:12]}) answers"

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
            text = text.replace(str(path), field_name).replace(tmp, "")
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
        known = ", ".join(sorted(holder.snapshot()[0])) or "none"
        raise ServiceError(404, f"no model answers for category {category!r} (loaded: {known})")
    rgb_arr = _decode_upload(rgb, "rgb", rgb_name, read_rgb, ".png")
    xyz_arr = _decode_upload(xyz, "xyz", xyz_name, read_xyz, ".tiff")
    try:
        result = score_arrays(
            live.model, live.extractors, rgb_arr, xyz_arr, f"xyz ({xyz_name})", gate_maps=False
        )
    except DataError as exc:
        raise ServiceError(422, str(exc)) from exc
    except Exception as exc:  # the model, not the part: one JSON line, never a bare 500
        log.error(f"{category}: scoring failed ({type(exc).__name__}: {exc})")
        raise ServiceError(
            500,
            f"the {category} model could not score this part ({type(exc).__name__}: {exc}); "
            "audit the deployment with `cfr audit`",
        ) from exc
    out = {
        "category": category,
        "version": live.version,
        "model_hash": live.model_hash,
        "score": result.score,
        "threshold": live.model.threshold,
        "verdict": result.verdict,
    }
    if line_log is not None:
        record_or_refuse(
            line_log,
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
            ),
        )
    if heatmap:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(result.heatmap()).save(buf, format="PNG")
        out["heatmap_png"] = base64.b64encode(buf.getvalue()).decode()
    return out


def record_or_refuse(line_log, row) -> None:
    """Record the verdict; a verdict that cannot be recorded is not given (HTTP 503)."""
    from cfr_core.line_log import LineLogError

    try:
        line_log.record(row)
    except LineLogError as exc:
        raise ServiceError(
            503, f"the verdict could not be recorded, so it is not given: {exc}"
        ) from exc


#: the largest request body read: both files at their cap, and room for the form's framing
MAX_BODY_BYTES = 2 * MAX_UPLOAD_BYTES + 1024 * 1024


#: parts decoded and scored at once: on 2 cores more only share the CPU, and each holds
#: its decoded scan (up to the pixel cap); the others wait their turn
MAX_CONCURRENT_SCORING = 2


def create_app(
    holder: ModelHolder,
    line_log=None,
    poll_seconds: float = 0.0,
    max_concurrent: int = MAX_CONCURRENT_SCORING,
) -> FastAPI:
    """The FastAPI application. With ``poll_seconds`` > 0 a background thread refreshes the
    holder from the registry that often (new deployments are audited, then swapped in). At
    most ``max_concurrent`` parts are decoded and scored at once, so that many small uploads
    that decode large cannot exhaust memory together."""
    stop = threading.Event()
    scoring_slots = threading.BoundedSemaphore(max_concurrent)

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

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)})

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        """Refuse an oversized body before it is read (the form parser would spool it)."""
        if request.method in ("POST", "PUT"):
            length = request.headers.get("content-length")
            if length is None:
                return JSONResponse(
                    status_code=411, content={"error": "send a Content-Length header"}
                )
            if not length.isdigit():
                return JSONResponse(status_code=400, content={"error": "bad Content-Length"})
            if int(length) > MAX_BODY_BYTES:
                return JSONResponse(
                    status_code=413,
                    content={"error": f"the request is larger than {MAX_BODY_BYTES // 2**20} MiB"},
                )
        return await call_next(request)

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
        live, _ = holder.snapshot()
        body = {"status": "ok" if live else "no model loaded", "models": len(live)}
        return JSONResponse(status_code=200 if live else 503, content=body)

    @app.get("/v1/models")
    def models():
        live, refused = holder.snapshot()  # copies: the poll thread may change both
        return {
            "models": [m.describe() for m in sorted(live.values(), key=lambda m: m.category)],
            "refused": refused,
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
        with scoring_slots:
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
