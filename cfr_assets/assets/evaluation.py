"""evaluation_report (the candidate model, its threshold and metrics) and deployed_bank."""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import torch

from cfr_assets.assets.training import attention_retriever, load_shot_features, load_tensors
from cfr_assets.partitions import stage_asset
from cfr_assets.pictures import gallery, loss_plot, png_markdown
from cfr_assets.resources import CFRData, CFRModelSettings, CFRStore
from cfr_core.data.mvtec import index_category
from cfr_core.data.prepare import prepare_sample
from cfr_core.engine.features import FeatureCache, extract_features
from cfr_core.engine.fit import calibrate, evaluate, test_samples
from cfr_core.io.artifacts import MODEL_JSON, load_model, model_from_parts, save_model, verify_model
from cfr_core.scoring.overlay import overlay

STAGES = (
    "normal_shots",
    "shot_features",
    "crossmodal_mappers",
    "memory_banks",
    "attention_retriever",
    "evaluation_report",
)


def _calibration(data: CFRData, store: CFRStore, category: str, shot_keys: set[str]):
    dataset = data.dataset()
    if dataset is not None and (dataset / category / "validation").is_dir():
        val = index_category(dataset, category).split("validation")
        if val:
            return val, "validation/good of the dataset"
    rest = [s for s in store.library().samples(category) if s.key not in shot_keys]
    if rest:
        return rest, "library scans not used as shots"
    return None, "the shots themselves (optimistic: add validation scans)"


@stage_asset(
    "The candidate model (safetensors + JSON), its pass/fail threshold, test metrics and a "
    "gallery of anomaly maps.",
    deps=[attention_retriever],
)
def evaluation_report(
    context: dg.AssetExecutionContext, data: CFRData, settings: CFRModelSettings, store: CFRStore
) -> dg.MaterializeResult:
    category = context.partition_key
    feats, info = load_shot_features(store, category)
    cfg = settings.fit_config(shots=len(feats))
    tensors, history = {}, {}
    for stage, name in (
        ("crossmodal_mappers", "mappers"),
        ("memory_banks", "banks"),
        ("attention_retriever", "retriever"),
    ):
        tensors.update(
            {
                k: v
                for k, v in load_tensors(store, category, stage, f"{name}.safetensors").items()
                if k != "empty"
            }
        )
        sidecar = Path(store.read_stage(category, stage)["folder"]) / f"{name}.json"
        if sidecar.exists():
            history.update(json.loads(sidecar.read_text()).get("history", {}))
    shots = [
        {k: s[k] for k in ("key", "rgb_path", "xyz_path", "rgb_sha256", "xyz_sha256")}
        for s in info["shots"]
    ]
    model = model_from_parts(
        {
            "category": category,
            "config": cfg,
            "extractor_ids": info["extractor_ids"],
            "dims": info["dims"],
            "shots": shots,
            "history": history,
        },
        tensors,
    )
    extractors = settings.build_extractors(cfg)
    cache = FeatureCache(store.feature_cache())
    val, source = _calibration(data, store, category, {s["key"] for s in shots})
    broken = [k for k, t in model.tensors().items() if not torch.isfinite(t).all()]
    if broken:  # write the candidate anyway: the blocking finite_weights check stops it
        context.log.error(
            f"non-finite weights in {', '.join(broken)}: not calibrated, not evaluated"
        )
        source = "not calibrated: non-finite weights"
    else:
        calib = extract_features(val, extractors, cfg.preprocess, cache) if val else feats
        calibrate(model, calib, source)
    meta: dict = {
        "threshold": model.threshold,
        "threshold_source": source,
        "method": cfg.method,
        "shots": len(shots),
    }
    report, pictures = None, []
    dataset = data.dataset()
    if not broken and dataset is not None and (dataset / category / "test").is_dir():
        ev = evaluate(model, dataset, cache, extractors)
        report = {**ev.report.to_dict(), "replacement_rate": ev.replacement_rate}
        samples = test_samples(dataset, category)
        picks = [i for i, s in enumerate(samples) if s.label == 0][:2]
        picks += [i for i, s in enumerate(samples) if s.label == 1][
            :: max(1, ev.report.n_defective // 6)
        ][:6]
        vmax = float(np.quantile(ev.result.maps.numpy(), 0.999))
        for i in picks:
            scan = prepare_sample(samples[i], cfg.preprocess)
            pictures.append(overlay(scan.rgb, ev.result.maps[i].numpy(), vmax, ev.masks[i].numpy()))
        aupro = report["aupro"]
        meta["metrics"] = dg.MetadataValue.md(
            "| I-AUROC | P-AUROC | AUPRO@30% | AUPRO@10% | AUPRO@5% | AUPRO@1% | replaced |\n|---|---|---|---|---|---|---|\n"
            f"| {report['image_auroc']:.3f} | {report['pixel_auroc']:.3f} | {aupro['0.3']:.3f} | {aupro['0.1']:.3f} "
            f"| {aupro['0.05']:.3f} | {aupro['0.01']:.3f} | {report['replacement_rate']:.3f} |"
        )
        meta["image_auroc"] = report["image_auroc"]
        meta["aupro_30"] = aupro["0.3"]
        meta["n_test"] = report["n_test"]
        meta["anomaly_maps"] = png_markdown(
            gallery(pictures), "anomaly maps: 2 good parts, then defects"
        )
    else:
        meta["metrics"] = (
            "no labelled test split configured (CFRData.dataset_root): metrics not computed"
        )
    if history:
        meta["loss_curves"] = png_markdown(loss_plot(history), "training losses")
    model.extra["metrics"] = report

    def write(folder: Path) -> None:
        save_model(model, folder, overwrite=True)
        (folder / "report.json").write_text(
            json.dumps(
                {"metrics": report, "threshold": model.threshold, "threshold_source": source},
                indent=2,
            )
            + "\n"
        )

    pointer = store.write_stage(category, "evaluation_report", write)
    meta["model_folder"] = dg.MetadataValue.path(pointer["folder"])
    meta["model_hash"] = verify_model(pointer["folder"])
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(meta["model_hash"]))


def candidate(store: CFRStore, category: str):
    """(model folder, model) of the latest evaluation_report."""
    folder = Path(store.read_stage(category, "evaluation_report")["folder"])
    return folder, load_model(folder)


@stage_asset(
    "The bank on the line: a registry row with every hash needed to audit it. Only materialized "
    "when the blocking checks on evaluation_report pass.",
    deps=[evaluation_report],
    kind="sql",
)
def deployed_bank(context: dg.AssetExecutionContext, store: CFRStore) -> dg.MaterializeResult:
    category = context.partition_key
    folder, _ = candidate(store, category)
    model_hash = verify_model(folder)
    meta = json.loads((folder / MODEL_JSON).read_text())
    artifacts = {}
    for stage in STAGES:
        for name, (path, sha) in store.read_stage(category, stage)["files"].items():
            artifacts[f"{stage}/{name}"] = [path, sha]
    registry = store.registry()
    record = registry.register(
        category=category,
        model_path=str(folder),
        model_hash=model_hash,
        artifact_hashes=artifacts,
        shot_hashes=meta["shots"],
        extractor_ids=meta["extractor_ids"],
        method_config=meta["config"],
        metrics=(meta.get("extra") or {}).get("metrics") or {},
        threshold=meta["threshold"],
        code_version=meta["code_version"],
        run_id=context.run.run_id,
    )
    context.log.info(f"deployed {category} version {record.version} ({model_hash[:12]})")
    return dg.MaterializeResult(
        metadata={
            "version": record.version,
            "model_hash": model_hash,
            "model_folder": dg.MetadataValue.path(str(folder)),
            "threshold": record.threshold,
            "registry": registry.url.split("@")[-1],
        },
        data_version=dg.DataVersion(model_hash),
    )
