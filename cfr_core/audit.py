"""Audit a deployment: derive everything it depends on, re-hash it, and compare.

What must exist is derived, never read from the registry row's own list:

1. the registry's rows and deploy log still match their hash chains;
2. the model folder matches its manifest (every file listed, none extra) and the
   row's model hash;
3. model.json's ``lineage`` names a version of every training stage
   (:data:`cfr_core.io.stages.TRAINING_STAGES`); each version folder still hashes
   to its name, holds the files that stage writes, and its ``stage.json`` names
   exactly the upstream versions of the same lineage;
4. every shot file recorded by ``normal_shots`` still hashes to its sha256, and
   the model and the features were built from those shots;
5. the row's shots, extractors, config, threshold and metrics equal the model's,
   and the row's artifact list equals the derived lineage.

Any mismatch fails the audit. What it cannot prove: that nobody rewrote the
files *and* recomputed every hash *and* the whole registry chain consistently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cfr_core.data.io import sha256_file
from cfr_core.engine.model import ShotRecord
from cfr_core.errors import CFRError
from cfr_core.io.artifacts import MODEL_JSON, load_model, read_json, verify_model
from cfr_core.io.stages import (
    MODEL_STAGE,
    REPORT_JSON,
    STAGE_FILES,
    STAGE_JSON,
    TRAINING_STAGES,
    UPSTREAM,
    StageStore,
    folder_hash,
)
from cfr_core.registry import BankRegistry, DeploymentRecord

Check = tuple[str, bool, str]


@dataclass
class AuditReport:
    category: str
    version: int
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def add(self, what: str, ok: bool, detail: str = "") -> None:
        self.checks.append((what, ok, detail))

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c[1]]


def _file_check(what: str, path: str | Path, expected: str) -> Check:
    p = Path(path)
    if p.is_symlink() or not p.is_file():
        return what, False, f"{p}: missing"
    got = sha256_file(p)
    ok = got == expected
    return what, ok, f"{p}: " + ("ok" if ok else f"sha256 {got[:12]} != recorded {expected[:12]}")


def _shot_fields(shots) -> list[dict] | None:
    """The recorded fields of each shot; None for anything but a list of objects (an
    edited row or model.json), which then equals nothing."""
    if not isinstance(shots, list) or not all(isinstance(s, dict) for s in shots):
        return None
    names = ShotRecord.__dataclass_fields__
    return [{k: s.get(k) for k in names} for s in shots]


def lineage_checks(stages: StageStore, category: str, model_folder: str | Path) -> list[Check]:
    """Checks of the chain model → stage versions → shot files (see the module docstring)."""
    checks: list[Check] = []
    folder = Path(model_folder)
    try:
        meta = read_json(folder / MODEL_JSON, "model.json")
    except CFRError as exc:
        return [("model.json readable", False, str(exc))]
    lineage = meta.get("lineage")
    if not isinstance(lineage, dict):
        return [("model names its stage versions", False, f"{folder / MODEL_JSON}: no lineage")]
    expected_folder = stages.folder(category, MODEL_STAGE, folder_hash(folder))
    checks.append(
        (
            "model folder is the evaluation_report version it claims",
            expected_folder.resolve() == folder.resolve(),
            str(folder),
        )
    )
    refs = {}
    for stage in TRAINING_STAGES:
        version = lineage.get(stage)
        if not isinstance(version, str):
            checks.append((f"stage {stage} in the lineage", False, "missing"))
            continue
        try:
            ref = stages.open(category, stage, version)
        except CFRError as exc:
            checks.append((f"stage {stage} intact", False, str(exc)))
            continue
        refs[stage] = ref
        missing = [n for n in (*STAGE_FILES[stage], STAGE_JSON) if not ref.file(n).is_file()]
        checks.append(
            (
                f"stage {stage} intact",
                not missing,
                f"{ref.folder}" + (f": lacks {missing}" if missing else ""),
            )
        )
    for stage, ref in {**refs, MODEL_STAGE: None}.items():
        path = (ref.folder if ref else folder) / STAGE_JSON
        try:
            stage_json = read_json(path, "stage.json", ("stage", "category", "inputs"))
        except CFRError as exc:
            checks.append((f"stage {stage} lineage", False, str(exc)))
            continue
        want = {u: lineage.get(u) for u in UPSTREAM[stage]}
        ok = (
            stage_json["stage"] == stage
            and stage_json["category"] == category
            and stage_json["inputs"] == want
        )
        checks.append((f"stage {stage} built from the same lineage", ok, str(path)))
    if "normal_shots" in refs:
        try:
            shots = refs["normal_shots"].json("shots.json")["shots"]
        except (CFRError, KeyError) as exc:
            return [*checks, ("shots.json readable", False, str(exc))]
        for shot in shots:
            checks.append(
                _file_check(f"shot {shot.get('key')} rgb", shot["rgb_path"], shot["rgb_sha256"])
            )
            checks.append(
                _file_check(f"shot {shot.get('key')} xyz", shot["xyz_path"], shot["xyz_sha256"])
            )
        checks.append(
            (
                "model shots = normal_shots",
                _shot_fields(meta.get("shots", [])) == _shot_fields(shots),
                "",
            )
        )
        if "shot_features" in refs:
            try:
                feat_shots = refs["shot_features"].json("features.json").get("shots", [])
                checks.append(
                    (
                        "features built from these shots",
                        _shot_fields(feat_shots) == _shot_fields(shots),
                        "",
                    )
                )
            except CFRError as exc:
                checks.append(("features built from these shots", False, str(exc)))
    return checks


def verify_lineage(stages: StageStore, category: str, model_folder: str | Path) -> list[str]:
    """The failed lineage checks as lines (empty when the chain is intact)."""
    return [
        f"{what}: {detail}"
        for what, ok, detail in lineage_checks(stages, category, model_folder)
        if not ok
    ]


def store_of(model_path: str | Path) -> StageStore:
    """The stage store a pipeline model folder lives in (<base>/stages/<cat>/<stage>/<version>)."""
    parents = Path(model_path).parents
    if len(parents) < 4:
        raise CFRError(
            f"{model_path}: not a pipeline model folder (<store>/stages/<category>/"
            "evaluation_report/<version>); the registry row was edited or is not the pipeline's"
        )
    return StageStore(parents[3])


def chain_check(registry: BankRegistry) -> Check:
    """The registry's rows and deploy log against their hash chains: the first check of
    every audit, made before any row is trusted."""
    try:
        problems = registry.verify()
    except CFRError as exc:
        problems = [str(exc)]
    except (ValueError, TypeError) as exc:  # a column that no longer parses (JSON, a date)
        problems = [f"a row cannot be read ({exc}): it was edited outside CFR Factory"]
    return "registry rows and deploy log match their hash chains", not problems, "; ".join(problems)


def audit(record: DeploymentRecord, registry: BankRegistry | None = None) -> AuditReport:
    """Every check of the module docstring; never raises on what it finds (an unreadable
    file, an edited row, a path that is not a model folder each become a failed check)."""
    report = AuditReport(record.category, record.version)
    if registry is not None:
        report.add(*chain_check(registry))
    try:
        _audit_files(record, report)
    except (CFRError, OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        report.add("deployment readable", False, f"{type(exc).__name__}: {exc}")
    return report


class AuditFailed(CFRError):
    """A version that does not pass the audit was not deployed."""

    def __init__(self, report: AuditReport, action: str):
        self.report = report
        lines = "; ".join(
            f"{what}: {detail}" if detail else what for what, _, detail in report.failures
        )
        super().__init__(
            f"refusing to {action} {report.category} version {report.version}: the audit failed "
            f"({lines}); the live deployment is unchanged. Run `cfr audit {report.category} "
            f"--version {report.version}` for the full report"
        )


def audited_deploy(
    registry: BankRegistry, category: str, version: int, action: str = "rollback", note: str = ""
) -> tuple[DeploymentRecord, AuditReport]:
    """Make ``version`` the live one only if its full audit (chains, lineage, files, row
    against model) passes; otherwise raise :class:`AuditFailed` and change nothing."""
    record = registry.get(category, version)
    report = audit(record, registry)
    if not report.ok:
        raise AuditFailed(report, action)
    return registry.activate(category, version, action, note), report


def audited_rollback(
    registry: BankRegistry, category: str, version: int, wait: float = 0.0
) -> tuple[DeploymentRecord, AuditReport]:
    """:func:`audited_deploy` as a rollback, holding the category's rebuild lock, so that
    a rebuild deploying at the same moment cannot undo it (or be undone) unseen."""
    with registry.category_lock(category, f"cfr registry rollback to v{version}", wait):
        return audited_deploy(registry, category, version, "rollback")


def _audit_files(record: DeploymentRecord, report: AuditReport) -> None:
    try:
        digest = verify_model(record.model_path)
        report.add("model folder matches its manifest", True, record.model_path)
        report.add(
            "model hash matches the registry",
            digest == record.model_hash,
            f"{digest[:16]} vs {record.model_hash[:16]}",
        )
    except CFRError as exc:
        report.add("model folder matches its manifest", False, str(exc))
        return
    meta = json.loads((Path(record.model_path) / MODEL_JSON).read_text())
    if not isinstance(meta, dict):
        raise ValueError("model.json is not an object")
    # the model must load as serving loads it (every field typed and ranged, the
    # method's tensors present): a version that would not serve is not deployed
    try:
        load_model(record.model_path, verify=False)
        report.add("model loads", True, "")
    except CFRError as exc:
        report.add("model loads", False, str(exc))
    for what, ok, detail in lineage_checks(
        store_of(record.model_path), record.category, record.model_path
    ):
        report.add(what, ok, detail)
    report.add("model category = registry category", meta.get("category") == record.category)
    report.add(
        "model shots = registry shots",
        _shot_fields(meta.get("shots", [])) == _shot_fields(record.shot_hashes),
    )
    report.add(
        "model extractors = registry extractors", meta.get("extractor_ids") == record.extractor_ids
    )
    report.add("model config = registry config", meta.get("config") == record.method_config)
    report.add("model threshold = registry threshold", meta.get("threshold") == record.threshold)
    metrics = (meta.get("extra") or {}).get("metrics") or {}
    report.add(
        "model metrics = registry metrics",
        json.loads(json.dumps(metrics)) == (record.metrics or {}),
    )
    try:
        rep = read_json(Path(record.model_path) / REPORT_JSON, "report.json")
        report.add(
            "evaluation report = registry metrics and threshold",
            (rep.get("metrics") or {}) == (record.metrics or {})
            and rep.get("threshold") == record.threshold,
        )
    except CFRError as exc:
        report.add("evaluation report = registry metrics and threshold", False, str(exc))
    lineage = meta.get("lineage") if isinstance(meta.get("lineage"), dict) else {}
    derived = {s: lineage.get(s) for s in TRAINING_STAGES} | {
        MODEL_STAGE: folder_hash(Path(record.model_path))
    }
    report.add(
        "registry artifact list = the derived lineage",
        record.artifact_hashes == derived,
        ""
        if record.artifact_hashes == derived
        else f"registry lists {sorted(record.artifact_hashes or {})}",
    )


#: recomputed features may differ from the stored ones by float noise only (threads,
#: kernels): at most this share of the stored features' largest magnitude
RECOMPUTE_TOLERANCE = 1e-4


def recompute_checks(record: DeploymentRecord) -> list[Check]:
    """Re-extract the shots' features from the recorded shot files, with the recorded
    configuration and extractors and no cache, and compare them with the shot_features
    stage the deployment was fitted on: a poisoned cache entry (or a rewritten stage whose
    hashes were all recomputed) shows as features that differ from a clean recomputation.
    The stages downstream of the features are re-hashed by :func:`audit`, not re-fitted."""
    from safetensors.torch import load_file

    from cfr_core.config import FitConfig
    from cfr_core.data.mvtec import manifest_samples
    from cfr_core.engine.features import build_extractors, extract_features

    try:
        meta = read_json(Path(record.model_path) / MODEL_JSON, "model.json")
        lineage = meta.get("lineage") or {}
        stages = store_of(record.model_path)
        shots = stages.open(record.category, "normal_shots", lineage["normal_shots"])
        feats = stages.open(record.category, "shot_features", lineage["shot_features"])
        config = FitConfig.from_dict(meta["config"])
        samples = manifest_samples(shots.json("shots.json"))
        stored = load_file(str(feats.file("features.safetensors")))
        extractors = build_extractors(config.extractors)
    except (CFRError, OSError, KeyError, TypeError, ValueError) as exc:
        return [
            ("features recomputed from the recorded shots", False, f"{type(exc).__name__}: {exc}")
        ]
    checks: list[Check] = []
    ids = {"rgb": extractors[0].lineage_id, "points": extractors[1].lineage_id}
    checks.append(
        (
            "extractors rebuilt = the recorded ones",
            ids == meta.get("extractor_ids"),
            "" if ids == meta.get("extractor_ids") else f"rebuilt {ids}",
        )
    )
    try:
        fresh = extract_features(samples, extractors, config.preprocess, cache=None)
    except (CFRError, OSError, RuntimeError, ValueError) as exc:
        checks.append(("features recomputed from the recorded shots", False, str(exc)))
        return checks
    for name, new in (("rgb", fresh.rgb), ("points", fresh.points)):
        old = stored.get(name)
        if old is None or old.shape != new.shape:
            shape = None if old is None else tuple(old.shape)
            checks.append((f"{name} features = a clean recomputation", False, f"stored {shape}"))
            continue
        scale = float(old.abs().max()) or 1.0
        worst = float((old.float() - new.float()).abs().max()) / scale
        checks.append(
            (
                f"{name} features = a clean recomputation",
                worst <= RECOMPUTE_TOLERANCE,
                f"largest difference {worst:.2e} of the features' scale "
                f"(tolerance {RECOMPUTE_TOLERANCE:g})",
            )
        )
    return checks


def audit_all(registry: BankRegistry) -> list[AuditReport]:
    """The deployed version of every category (the registry's chains are checked in each)."""
    return [audit(rec, registry) for c in registry.categories() if (rec := registry.deployed(c))]


__all__ = [
    "AuditFailed",
    "AuditReport",
    "audit",
    "audit_all",
    "audited_deploy",
    "audited_rollback",
    "chain_check",
    "lineage_checks",
    "recompute_checks",
    "verify_lineage",
]
