"""normal_shots: ingest the landing folder (quality-gated) and choose the shots."""

import json
import tempfile
from pathlib import Path

import dagster as dg

from cfr_assets.partitions import stage_asset
from cfr_assets.pictures import png_markdown
from cfr_assets.resources import CFRData, CFRModelSettings, CFRStore
from cfr_core.data.fewshot import select_shots
from cfr_core.data.io import read_rgb, read_xyz, sha256_file
from cfr_core.data.landing import scan_landing
from cfr_core.data.mvtec import GOOD, Sample, index_category
from cfr_core.scoring.overlay import save_overlay


def deployed_gate(store: CFRStore, category: str):
    """(model, extractors) of the deployed version, or None when nothing is deployed."""
    from cfr_core.engine.features import build_extractors
    from cfr_core.io.artifacts import load_model

    record = store.registry().deployed(category)
    if record is None:
        return None
    model = load_model(record.model_path)
    return model, build_extractors(model.config.extractors), record.version


def manifest_samples(manifest: dict) -> list[Sample]:
    return [
        Sample(
            manifest["category"], "train", GOOD, s["stem"], Path(s["rgb_path"]), Path(s["xyz_path"])
        )
        for s in manifest["shots"]
    ]


@stage_asset(
    "Normal scans of the category: landing-folder scans validated, quality-gated by the deployed "
    "model and ingested into the content-addressed shot library; the shots chosen by the few-shot protocol.",
    kind="python",
)
def normal_shots(
    context: dg.AssetExecutionContext, data: CFRData, settings: CFRModelSettings, store: CFRStore
) -> dg.MaterializeResult:
    category = context.partition_key
    library = store.library()
    scans, problems = scan_landing(data.landing_dir() / category, category)
    for p in problems:
        context.log.warning(f"not ingested: {p.path}: {p.reason}")
    gate = deployed_gate(store, category) if settings.quality_gate else None
    accepted, quarantined, pictures = [], [], []
    for scan in scans:
        if library.contains(category, scan.content_id) or library.quarantined(
            category, scan.content_id
        ):
            continue
        if gate is not None:
            from cfr_core.engine.score import score_arrays

            model, extractors, version = gate
            result = score_arrays(
                model,
                extractors,
                read_rgb(scan.rgb_path),
                read_xyz(scan.xyz_path),
                str(scan.xyz_path),
            )
            if result.verdict == "FAIL":
                with tempfile.TemporaryDirectory() as tmp:
                    heat = save_overlay(
                        Path(tmp) / "heatmap.png",
                        result.heatmap(),
                        f"{scan.name} score {result.score:.2f} > {result.threshold:.2f}",
                    )
                    reason = (
                        f"scored {result.score:.3f} above the threshold {result.threshold:.3f} "
                        f"of deployed version {version}; release with `cfr shots release`"
                    )
                    library.quarantine(scan, reason, heat, result.score, result.threshold)
                quarantined.append((scan, result.score))
                pictures.append(result.heatmap())
                context.log.warning(f"quarantined {scan.rgb_path.name}: {reason}")
                continue
        library.add(scan)
        accepted.append(scan)
    pool = library.samples(category)
    dataset = data.dataset()
    if data.use_dataset_train and dataset is not None and (dataset / category).is_dir():
        pool += index_category(dataset, category).split("train")
    if not pool:
        raise dg.Failure(
            f"no normal scans for {category!r}: drop <name>.png + <name>.tiff pairs into "
            f"{data.landing_dir() / category}"
        )
    selection = select_shots(pool, min(settings.shots, len(pool)), settings.fewshot_seed)
    manifest = {
        "category": category,
        "pool": len(pool),
        "seed": selection.seed,
        "shots": [
            {
                "key": s.key,
                "stem": s.stem,
                "rgb_path": str(s.rgb_path),
                "xyz_path": str(s.xyz_path),
                "rgb_sha256": sha256_file(s.rgb_path),
                "xyz_sha256": sha256_file(s.xyz_path),
            }
            for s in selection.samples
        ],
        "problems": [{"path": str(p.path), "reason": p.reason} for p in problems],
    }
    pointer = store.write_stage(
        category,
        "normal_shots",
        lambda d: (d / "shots.json").write_text(json.dumps(manifest, indent=2) + "\n"),
    )
    rows = "\n".join(
        f"| {s['stem']} | `{s['rgb_sha256'][:12]}` | `{s['xyz_sha256'][:12]}` |"
        for s in manifest["shots"]
    )
    meta = {
        "pool_size": len(pool),
        "shots": len(selection.samples),
        "new_accepted": len(accepted),
        "new_quarantined": len(quarantined),
        "not_ingested": len(problems),
        "shot_table": dg.MetadataValue.md(
            "| scan | rgb sha256 | xyz sha256 |\n|---|---|---|\n" + rows
        ),
        "manifest": dg.MetadataValue.path(pointer["files"]["shots.json"][0]),
    }
    if problems:
        meta["problems"] = dg.MetadataValue.md(
            "| file | reason |\n|---|---|\n"
            + "\n".join(f"| {p.path.name} | {p.reason} |" for p in problems)
        )
    if pictures:
        from cfr_assets.pictures import gallery

        meta["quarantined_heatmaps"] = png_markdown(gallery(pictures), "quarantined scans")
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(pointer["version"]))
