"""Audit a deployment: re-hash every file it depends on and walk its lineage.

For a registry row: the model folder must match its manifest and the row's
model hash; every stage artifact and every shot file must still hash to what
was recorded; and the model's own record (shots, extractor ids, config,
threshold) must agree with the row. Any mismatch fails the audit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cfr_core.data.io import sha256_file
from cfr_core.errors import CFRError
from cfr_core.io.artifacts import MODEL_JSON, verify_model
from cfr_core.registry import DeploymentRecord


@dataclass
class AuditReport:
    category: str
    version: int
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def add(self, what: str, ok: bool, detail: str = "") -> None:
        self.checks.append((what, ok, detail))


def _file_check(report: AuditReport, what: str, path: str, expected: str) -> None:
    p = Path(path)
    if not p.is_file():
        report.add(what, False, f"{p}: missing")
        return
    got = sha256_file(p)
    report.add(
        what,
        got == expected,
        f"{p}: " + ("ok" if got == expected else f"sha256 {got[:12]} != recorded {expected[:12]}"),
    )


def audit(record: DeploymentRecord) -> AuditReport:
    report = AuditReport(record.category, record.version)
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
        return report
    for name, (path, sha) in sorted(record.artifact_hashes.items()):
        _file_check(report, f"artifact {name}", path, sha)
    for shot in record.shot_hashes:
        _file_check(report, f"shot {shot['key']} rgb", shot["rgb_path"], shot["rgb_sha256"])
        _file_check(report, f"shot {shot['key']} xyz", shot["xyz_path"], shot["xyz_sha256"])
    meta = json.loads((Path(record.model_path) / MODEL_JSON).read_text())
    report.add("model shots = registry shots", meta["shots"] == record.shot_hashes)
    report.add(
        "model extractors = registry extractors", meta["extractor_ids"] == record.extractor_ids
    )
    report.add("model config = registry config", meta["config"] == record.method_config)
    report.add("model threshold = registry threshold", meta.get("threshold") == record.threshold)
    return report
