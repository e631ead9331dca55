"""The landing folder, the shot library and the quarantine.

Operators drop new good scans as flat pairs into ``<landing>/<category>/``:
``<name>.png`` (RGB) + ``<name>.tiff`` (organized xyz). A scan is only ingested
when both files exist, decode and agree; incomplete pairs, corrupt files and
unsafe names are reported and left in place.

Ingested scans are copied into the content-addressed shot library
(``<library>/<category>/<id>/{rgb.png, xyz.tiff, scan.json}``, id = hash of
both files), so a bank can always be traced to immutable bytes even after the
landing folder is cleaned. A scan the deployed model finds anomalous goes to
the quarantine instead, with its heatmap and the reason, until a person
releases it.

Each library record says how the scan got in (``admitted``): ``"no gate"`` (dropped
while no gate was in force: before the first deployment, or with the gate switched
off), ``"gate"`` (the gate of deployed version ``gate_version`` passed it on its own)
or ``"released"`` (a person released it from the quarantine). The first and the last a
person vouched for; only those calibrate the next gate (:meth:`ShotLibrary.samples`
with ``vouched=True``), so the gate does not learn from its own verdicts. Records
written before this field existed (``"unrecorded"``) count as vouched for: they cannot
be told apart, and leaving them out could leave a gate with too few scans.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from cfr_core.data.io import atomic_folder, read_rgb, read_xyz, sha256_file
from cfr_core.data.mvtec import GOOD, Sample
from cfr_core.data.validate import DEFAULT_MIN_VALID_FRACTION, ERROR, check_scan_arrays
from cfr_core.errors import DataError
from cfr_core.paths import check_content_id, check_name, inside, is_safe_name, refuse_symlink

RGB_EXT = ".png"
NO_GATE, GATE, RELEASED = "no gate", "gate", "released"  # how a scan entered the library
UNRECORDED = "unrecorded"  # a record written before the library recorded it: counts as vouched
XYZ_EXT = (".tiff", ".tif")


@dataclass(frozen=True)
class LandingScan:
    category: str
    name: str
    rgb_path: Path
    xyz_path: Path
    rgb_sha256: str
    xyz_sha256: str

    @property
    def content_id(self) -> str:
        return hashlib.sha256(f"{self.rgb_sha256}:{self.xyz_sha256}".encode()).hexdigest()[:20]


@dataclass(frozen=True)
class LandingProblem:
    path: Path
    reason: str


def scan_landing(
    folder: str | Path, category: str
) -> tuple[list[LandingScan], list[LandingProblem]]:
    """Valid pairs in ``folder`` and the problems of everything else (nothing is moved)."""
    folder = Path(folder)
    check_name(category)
    scans: list[LandingScan] = []
    problems: list[LandingProblem] = []
    if folder.is_symlink():
        return scans, [LandingProblem(folder, "the category folder is a symbolic link: refused")]
    if not folder.is_dir():
        return scans, problems
    groups: dict[str, dict[str, Path]] = {}
    clashes: set[Path] = set()
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_symlink():
            problems.append(LandingProblem(path, "symbolic link refused (copy the file itself in)"))
            continue
        if path.is_dir():
            problems.append(
                LandingProblem(path, "folders are not scanned; drop <name>.png + <name>.tiff pairs")
            )
            continue
        ext = path.suffix.lower()
        if ext != RGB_EXT and ext not in XYZ_EXT:
            problems.append(LandingProblem(path, "not a scan file (expected .png + .tiff pairs)"))
            continue
        if not is_safe_name(path.stem):
            problems.append(
                LandingProblem(path, "unsafe file name (use letters, digits, '.', '_', '-')")
            )
            continue
        # paired without regard to case (as a Windows share shows them); two files that
        # would pair the same way are both refused, never one silently in place of the other
        kind = "rgb" if ext == RGB_EXT else "xyz"
        group = groups.setdefault(path.stem.lower(), {})
        if kind in group:
            other = group[kind]
            clashes.update((other, path))
            continue
        group[kind] = path
    for path in sorted(clashes):
        same = sorted(p.name for p in clashes if p.stem.lower() == path.stem.lower())
        problems.append(
            LandingProblem(
                path,
                f"names differ only by case or extension ({', '.join(same)}): rename all but one",
            )
        )
    for key in {p.stem.lower() for p in clashes}:
        for path in groups.pop(key, {}).values():
            if path not in clashes:
                problems.append(
                    LandingProblem(path, "not ingested: which file is its pair is ambiguous")
                )
    for _, pair in sorted(groups.items()):
        name = (pair.get("rgb") or pair["xyz"]).stem
        if "rgb" not in pair:
            problems.append(LandingProblem(pair["xyz"], f"incomplete pair: {name}.png is missing"))
            continue
        if "xyz" not in pair:
            problems.append(LandingProblem(pair["rgb"], f"incomplete pair: {name}.tiff is missing"))
            continue
        try:
            rgb, xyz = read_rgb(pair["rgb"]), read_xyz(pair["xyz"])
        except DataError as exc:
            problems.append(LandingProblem(exc.path or pair["rgb"], exc.reason))
            continue
        errors = [
            p
            for p in check_scan_arrays(
                rgb, xyz, pair["rgb"], pair["xyz"], DEFAULT_MIN_VALID_FRACTION
            )
            if p.severity == ERROR
        ]
        if errors:  # the same checks as fit, evaluate, score and `cfr data check`
            problems.append(LandingProblem(errors[0].path, errors[0].reason))
            continue
        scans.append(
            LandingScan(
                category,
                name,
                pair["rgb"],
                pair["xyz"],
                sha256_file(pair["rgb"]),
                sha256_file(pair["xyz"]),
            )
        )
    return scans, problems


def content_hash(scans: list[LandingScan]) -> str:
    """One hash for a set of scans (order-independent): the sensor's run key."""
    return hashlib.sha256("\n".join(sorted(s.content_id for s in scans)).encode()).hexdigest()[:24]


class ShotLibrary:
    """Content-addressed store of accepted normal scans, plus the quarantine."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, category: str, content_id: str, quarantine: bool = False) -> Path:
        """The scan's folder, after checking the name, the id and that it stays in the library."""
        path = (
            self.root
            / ("quarantine" if quarantine else "library")
            / check_name(category)
            / check_content_id(content_id)
        )
        inside(self.root, path)
        return path

    def contains(self, category: str, content_id: str) -> bool:
        return (self.folder(category, content_id) / "scan.json").exists()

    def quarantined(self, category: str, content_id: str) -> bool:
        return (self.folder(category, content_id, True) / "scan.json").exists()

    def _store(self, scan: LandingScan, quarantine: bool, extra: dict) -> Path:
        target = self.folder(scan.category, scan.content_id, quarantine)
        with atomic_folder(target, overwrite=True) as tmp:
            for src, name, digest in (
                (scan.rgb_path, "rgb.png", scan.rgb_sha256),
                (scan.xyz_path, "xyz.tiff", scan.xyz_sha256),
            ):
                refuse_symlink(src)
                shutil.copyfile(src, tmp / name)
                if sha256_file(tmp / name) != digest:
                    raise DataError(
                        "file changed while it was being copied into the library",
                        src,
                        "let the scanner finish writing; the next tick ingests it",
                    )
            meta = {
                **{k: str(v) for k, v in asdict(scan).items()},
                "content_id": scan.content_id,
                **extra,
            }
            for name in extra.get("files", {}):
                shutil.copyfile(extra["files"][name], tmp / name)
            (tmp / "scan.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
        return target

    def add(self, scan: LandingScan, gate_version: int | None = None) -> Path:
        """Accept ``scan``: passed by the gate of deployed version ``gate_version``, or
        (None) dropped while no gate was in force."""
        if gate_version is None:
            return self._store(scan, False, {"admitted": NO_GATE})
        return self._store(scan, False, {"admitted": GATE, "gate_version": gate_version})

    def quarantine(
        self,
        scan: LandingScan,
        reason: str,
        heatmap: Path | None = None,
        score: float | None = None,
        threshold: float | None = None,
    ) -> Path:
        files = {"heatmap.png": str(heatmap)} if heatmap else {}
        return self._store(
            scan, True, {"reason": reason, "score": score, "threshold": threshold, "files": files}
        )

    def release(self, category: str, content_id: str) -> Path:
        """A person confirmed a quarantined scan is good: move it into the library."""
        src = self.folder(category, content_id, True)
        if not (src / "scan.json").exists():
            raise DataError(
                f"no quarantined scan {content_id!r} in {category!r}",
                src,
                "list them with `cfr shots quarantine`",
            )
        dst = self.folder(category, content_id)
        meta = read_scan_json(src / "scan.json")
        with atomic_folder(dst, overwrite=True) as tmp:
            for name, key in (("rgb.png", "rgb_sha256"), ("xyz.tiff", "xyz_sha256")):
                if not (src / name).is_file():
                    raise DataError(
                        "quarantined scan is incomplete: this file is missing",
                        src / name,
                        "the scan cannot be released; drop it into the landing folder again",
                    )
                shutil.copyfile(refuse_symlink(src / name), tmp / name)
                if sha256_file(tmp / name) != meta.get(key):
                    raise DataError(
                        "quarantined file no longer matches its record (altered)", src / name
                    )
            meta["released_from_quarantine"] = meta.pop("reason", "")
            meta["admitted"] = RELEASED
            (tmp / "scan.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(src)
        return dst

    def samples(self, category: str, vouched: bool = False) -> list[Sample]:
        """Accepted scans as normal samples (sorted by content id); with ``vouched``, only
        those a person vouched for (not the ones the gate passed on its own)."""
        base = self.root / "library" / check_name(category)
        if not base.is_dir():
            return []
        return [
            Sample(category, "train", GOOD, d.name, d / "rgb.png", d / "xyz.tiff")
            for d in sorted(base.iterdir())
            if (d / "scan.json").exists()
            and (not vouched or admitted(read_scan_json(d / "scan.json"), d / "scan.json") != GATE)
        ]

    def pool_hash(self, category: str) -> str:
        """One hash of the accepted scans of ``category`` (changes when one is added or released)."""
        ids = [s.stem for s in self.samples(category)]
        return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:24] if ids else ""

    def info(self, category: str, content_id: str, quarantine: bool = False) -> dict:
        """The scan's record (operator's file name, hashes, reason)."""
        return read_scan_json(self.folder(category, content_id, quarantine) / "scan.json")

    def quarantine_list(self, category: str | None = None) -> list[dict]:
        """The quarantined scans' records (with category and content id)."""
        return self._records("quarantine", category)

    def library_list(self, category: str | None = None) -> list[dict]:
        """The accepted scans' records (with category, content id and ``admitted``)."""
        return [
            {**r, "admitted": admitted(r, r["path"])} for r in self._records("library", category)
        ]

    def _records(self, part: str, category: str | None) -> list[dict]:
        """Each scan's record, with the category, content id and path of the folder it is in
        (the folder wins over a hand-edited record)."""
        base = self.root / part
        out = []
        for cat_dir in sorted(base.iterdir()) if base.is_dir() else []:
            if not cat_dir.is_dir() or (category and cat_dir.name != category):
                continue  # a stray file beside the category folders holds no scan
            for d in sorted(cat_dir.iterdir()):
                if d.is_dir() and (d / "scan.json").exists():
                    out.append(
                        {
                            **read_scan_json(d / "scan.json"),
                            "category": cat_dir.name,
                            "content_id": d.name,
                            "path": d / "scan.json",
                        }
                    )
        return out


def admitted(record: dict, path: Path | None = None) -> str:
    """How a library scan got in: :data:`NO_GATE`, :data:`GATE` (its ``gate_version`` a
    positive integer) or :data:`RELEASED`; a record older than the field is
    :data:`RELEASED` when it says so, else :data:`UNRECORDED`. Anything else is a
    DataError naming ``path``."""
    fix = "the record was edited by hand: restore it, or remove the scan and drop it again"
    if "admitted" not in record:
        return RELEASED if "released_from_quarantine" in record else UNRECORDED
    how = record["admitted"]
    if how not in (NO_GATE, GATE, RELEASED):
        raise DataError(
            f"unknown admitted value {how!r} in a scan record (expected {NO_GATE!r}, "
            f"{GATE!r} or {RELEASED!r})",
            path,
            fix,
        )
    version = record.get("gate_version")
    if (how == GATE) != ("gate_version" in record) or (
        how == GATE and (isinstance(version, bool) or not isinstance(version, int) or version < 1)
    ):
        raise DataError(
            f"admitted {how!r} with gate_version {version!r}: a scan the gate passed names "
            "the deployed version (an integer >= 1), and only such a scan",
            path,
            fix,
        )
    return how


def read_scan_json(path: Path) -> dict:
    """A library record; one line naming the file when it is damaged."""
    from cfr_core.io.artifacts import read_json

    return read_json(path, "scan record", ("content_id",))
