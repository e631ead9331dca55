"""shot_library: new good scans from the landing folder, quality-gated, into the shot library."""

import tempfile
from pathlib import Path

import dagster as dg

from cfr_assets.partitions import INGEST, stage_asset
from cfr_assets.pictures import gallery, png_markdown
from cfr_assets.resources import CFRData, CFRModelSettings, CFRStore
from cfr_core.data.io import read_rgb, read_xyz
from cfr_core.data.landing import LandingScan, scan_landing
from cfr_core.engine.gate import gate_decision, gate_heatmap
from cfr_core.errors import CFRError
from cfr_core.scoring.overlay import save_overlay


def deployed_gate(store: CFRStore, category: str):
    """(model, extractors, version) of the live model of ``category``, or None."""
    from cfr_core.engine.features import build_extractors
    from cfr_core.io.artifacts import load_model

    record = store.registry().deployed(category)
    if record is None:
        return None
    model = load_model(record.model_path)
    return model, build_extractors(model.config.extractors), record.version


def gate_scan(gate, scan: LandingScan):
    """(gate decision, scored scan) of a landing scan under the deployed model: its score
    against the gate threshold and, where the model holds one, the library check."""
    from cfr_core.engine.score import score_arrays

    model, extractors, _ = gate
    result = score_arrays(
        model, extractors, read_rgb(scan.rgb_path), read_xyz(scan.xyz_path), str(scan.xyz_path)
    )
    return gate_decision(model, result.score, result.features), result


@stage_asset(
    """**Shot library** of the category: the good scans operators dropped as
`<name>.png` + `<name>.tiff` into `<landing>/<category>/`.

Each new pair is validated, then passes the deployed model's **quality gate**:
its score against the model's gate threshold and, when the model holds a library
check, its foreground and its novelty against the good library scans (up to the
24 most varied): RGB, 3D and their pairing (each modality can look good while the
pair does not), the scan's own colour (a stain in a colour no good part shows) and
its surface's curvature over 2 mm (a dent or bump no good part shows).
A scan that fails any check goes to the quarantine with the failed checks and a
heatmap (a person releases it with `cfr shots release`); the others are copied
into the content-addressed library. Bad files are reported, never silently skipped. The
data version is the hash of the accepted scans, so the rebuild sensor only
starts a rebuild when the library really changed.

Every accepted scan can become a shot, but only the scans a person vouched for
(`vouched_scans`: dropped while no gate was in force, or released from the
quarantine) calibrate the next gate: the gate does not learn from its own
verdicts.""",
    kinds=("python", "filesystem"),
    group=INGEST,
)
def shot_library(
    context: dg.AssetExecutionContext, data: CFRData, settings: CFRModelSettings, store: CFRStore
) -> dg.MaterializeResult:
    # the ingest lock only (not the rebuild's): a scan's gate check never waits for training
    try:
        holder = f"run {context.run.run_id[:8]} ({context.run.job_name}, ingest)"
    except Exception:  # invoked directly, outside a run: the context has no run
        holder = "shot_library (invoked directly)"
    with store.ingest_lock(context.partition_key, holder):
        return _ingest(context, data, settings, store)


def _ingest(
    context: dg.AssetExecutionContext, data: CFRData, settings: CFRModelSettings, store: CFRStore
) -> dg.MaterializeResult:
    category = context.partition_key
    library = store.library()
    scans, problems = scan_landing(data.landing_dir() / category, category)
    problems = [(str(p.path), p.reason) for p in problems]
    gate = deployed_gate(store, category) if settings.quality_gate else None
    rows, pictures = [], []
    for scan in scans:
        if library.contains(category, scan.content_id) or library.quarantined(
            category, scan.content_id
        ):
            continue
        try:
            verdict, score, limit, checks = "accepted", None, None, ""
            if gate is not None:
                decision, result = gate_scan(gate, scan)
                score, limit = result.score, decision.checks["model score"][1]
                checks = decision.describe()
                if not decision.passed:
                    verdict = "quarantined"
                    reason = (
                        f"{' and '.join(decision.failed())} above the gate of deployed version "
                        f"{gate[2]} ({checks}); a person may release it with "
                        f"`cfr shots release {category} {scan.content_id} --yes`"
                    )
                    picture, what = gate_heatmap(decision, result)
                    with tempfile.TemporaryDirectory() as tmp:
                        heat = save_overlay(
                            Path(tmp) / "heatmap.png", picture, f"{scan.name}: {what}"
                        )
                        library.quarantine(scan, reason, heat, score, limit)
                    pictures.append(picture)
                    context.log.warning(f"quarantined {scan.rgb_path.name}: {reason}")
            if verdict == "accepted":
                library.add(scan, gate[2] if gate is not None else None)
            rows.append((scan, verdict, score, limit, checks))
        except CFRError as exc:  # this scan only: the others of the batch are still ingested
            problems.append((str(getattr(exc, "path", None) or scan.rgb_path), str(exc)))
            context.log.warning(f"not ingested: {exc}")
    for path, reason in problems:
        context.log.warning(f"not ingested: {path}: {reason}")
    pool = library.samples(category)
    try:
        vouched: int | str = len(library.samples(category, vouched=True))
    except CFRError as exc:  # the batch is in; the rebuild will stop on this record too
        vouched = f"unknown: {exc}"
        context.log.error(f"a library record is damaged: {exc}")
    meta: dict = {
        "accepted_scans": len(pool),
        "vouched_scans": vouched,
        "new_accepted": sum(r[1] == "accepted" for r in rows),
        "new_quarantined": sum(r[1] == "quarantined" for r in rows),
        "not_ingested": len(problems),
        "gate": "off"
        if not settings.quality_gate
        else ("no deployed model yet" if gate is None else f"deployed version {gate[2]}"),
        "pool_hash": library.pool_hash(category),
    }
    if rows:
        meta["new_scans"] = dg.MetadataValue.table(
            [
                dg.TableRecord(
                    {
                        "file": s.rgb_path.name,
                        "id": s.content_id,
                        "verdict": v,
                        "admitted": (f"gate v{gate[2]}" if gate is not None else "no gate")
                        if v == "accepted"
                        else "",
                        "score": round(score, 4) if score is not None else None,
                        "gate": round(limit, 4) if limit is not None else None,
                        "checks": checks,
                    }
                )
                for s, v, score, limit, checks in rows
            ],
            dg.TableSchema(
                columns=[
                    dg.TableColumn("file", "string"),
                    dg.TableColumn("id", "string"),
                    dg.TableColumn("verdict", "string"),
                    dg.TableColumn(
                        "admitted",
                        "string",
                        "how it entered the library: 'no gate' scans calibrate the next gate, "
                        "scans a gate passed on its own ('gate vN') do not",
                    ),
                    dg.TableColumn("score", "float"),
                    dg.TableColumn("gate", "float"),
                    dg.TableColumn("checks", "string"),
                ]
            ),
        )
    if problems:
        meta["problems"] = dg.MetadataValue.md(
            "| file | reason |\n|---|---|\n"
            + "\n".join(f"| {Path(p).name} | {r} |" for p, r in problems)
        )
    if pictures:
        meta["quarantine_heatmaps (picture)"] = png_markdown(gallery(pictures), "quarantined")
    return dg.MaterializeResult(
        metadata=meta, data_version=dg.DataVersion(meta["pool_hash"] or "empty")
    )
