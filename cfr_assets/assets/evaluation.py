"""evaluation_report (the candidate model, its thresholds and metrics) and deployed_bank."""

import json
from pathlib import Path

import dagster as dg
import numpy as np
import torch

from cfr_assets.assets.shots import stage_result
from cfr_assets.assets.training import (
    attention_retriever,
    curves,
    load_banks,
    load_features,
    load_mappers,
    load_norm,
    load_retriever,
    read_tensors,
    run_config,
)
from cfr_assets.handoff import upstream
from cfr_assets.partitions import RELEASE, stage_asset
from cfr_assets.pictures import captioned, gallery, png_markdown, score_histogram, verdict_table
from cfr_assets.resources import CFRData, CFRModelSettings, CFRStore
from cfr_core.audit import AuditFailed, audit, audited_deploy, verify_lineage
from cfr_core.data.mvtec import index_category, manifest_samples
from cfr_core.data.prepare import prepare_sample
from cfr_core.engine.features import FeatureCache
from cfr_core.engine.fit import assemble, calibrate_and_gate, evaluate, test_samples
from cfr_core.engine.gate import gate_summary
from cfr_core.engine.model import ShotRecord
from cfr_core.io.artifacts import MODEL_JSON, load_model, save_model, verify_model
from cfr_core.io.stages import REPORT_JSON, STAGE_JSON, TRAINING_STAGES, StageRef
from cfr_core.scoring.overlay import overlay
from cfr_core.scoring.verdict import threshold_table

#: threshold source when every vouched scan is a shot and there is no validation split
GATE_PASSED_ONLY = (
    "scans of the pool not used as shots: only ones a gate passed on its own (no vouched "
    "scan is left beside the shots; add validation/good scans)"
)


def _calibration(data: CFRData, store: CFRStore, category: str, shot_keys: set[str]):
    """Normal scans the model has not seen, for the line's and the gate's thresholds: the
    dataset's validation/good, else the pool's scans that are not shots and that a person
    vouched for (library, and the dataset's train/good when it is in the pool), else (said
    loudly: :data:`GATE_PASSED_ONLY`) the ones a gate passed on its own."""
    dataset = data.dataset()
    if data.has_split(category, "validation"):
        val = index_category(dataset, category).split("validation")
        if val:
            return val, "validation/good"
    library = store.library()
    vouched = {s.key for s in library.samples(category, vouched=True)}
    rest = [s for s in library.samples(category) if s.key not in shot_keys]
    if data.use_dataset_train and data.has_split(category, "train"):
        train = index_category(dataset, category).split("train")
        rest += [s for s in train if s.key not in shot_keys]
        vouched |= {s.key for s in train}
    if any(s.key in vouched for s in rest):
        return [s for s in rest if s.key in vouched], "vouched scans of the pool not used as shots"
    if rest:
        return rest, GATE_PASSED_ONLY
    return None, "the shots themselves (optimistic: add validation scans)"


def _gate_library(data: CFRData, store: CFRStore, category: str):
    """The good scans the next gate is built from: the library scans a person vouched for
    (not the ones the last gate passed on its own), the dataset's train/good when it is in
    the pool, and its validation/good; and how many library scans were left out."""
    dataset = data.dataset()
    library = store.library()
    pool = library.samples(category, vouched=True)
    left_out = len(library.samples(category)) - len(pool)
    for split, wanted in (("train", data.use_dataset_train), ("validation", True)):
        if wanted and data.has_split(category, split):
            pool += index_category(dataset, category).split(split)
    return pool, left_out


def candidate_ref(context, store: CFRStore) -> StageRef:
    """The evaluation_report version of this run (what the checks judge and deployed_bank deploys)."""
    return upstream(context, store, "evaluation_report")


def candidate_rows(ev, threshold: float | None, gate: float | None):
    """(threshold, false rejects, escapes, note) at the line threshold, the gate's, a few
    multiples of the line's, and the highest good test score (the least that rejects none)."""
    if threshold is None:
        return []
    good = [float(x) for x, d in zip(ev.scores, ev.defects, strict=True) if d == "good"]
    marks = {threshold: "deployed (line)"}
    for f in (0.8, 0.9, 1.1, 1.25, 1.5):
        marks.setdefault(threshold * f, f"line x {f:g}")
    if gate is not None:
        marks[gate] = "quality gate"
    if good:
        marks.setdefault(max(good), "highest good test score")
    ts = sorted(marks)
    return [(t, frr, esc, marks[t]) for t, frr, esc in threshold_table(ev.scores, ev.defects, ts)]


def metrics_table(report: dict) -> dg.MetadataValue:
    aupro = report["aupro"]

    def pct(key: str) -> str:
        value = report.get(key)
        return "-" if value is None else f"{value:.1%}"

    return dg.MetadataValue.md(
        "| I-AUROC | P-AUROC | AUPRO@30% | AUPRO@10% | AUPRO@5% | AUPRO@1% | replaced "
        "| good rejected | defective passed | oracle passed |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {report['image_auroc']:.3f} | {report['pixel_auroc']:.3f} | {aupro['0.3']:.3f} | "
        f"{aupro['0.1']:.3f} | {aupro['0.05']:.3f} | {aupro['0.01']:.3f} | "
        f"{report['replacement_rate']:.3f} | {pct('false_reject_rate')} | {pct('escape_rate')} "
        f"| {pct('oracle_escape_rate')} |"
    )


@stage_asset(
    """The **candidate model** (a model folder: safetensors + JSON + manifest),
assembled from this run's stages, with its pass/fail threshold and gate
threshold calibrated on normal scans it has not seen, its test metrics when a
labelled dataset is configured, and a gallery of anomaly maps. Blocking checks
judge it before `deployed_bank` may deploy it.""",
    deps=[attention_retriever],
    kinds=("pytorch", "safetensors", "json"),
    group=RELEASE,
)
def evaluation_report(
    context: dg.AssetExecutionContext, data: CFRData, settings: CFRModelSettings, store: CFRStore
) -> dg.MaterializeResult:
    category = context.partition_key
    refs = {stage: upstream(context, store, stage) for stage in TRAINING_STAGES}
    cfg = run_config(settings, refs["attention_retriever"])
    _, info = load_features(refs["shot_features"])
    banks, joint, bank_info = load_banks(refs["memory_banks"])
    history = {
        "mappers": read_tensors(refs["crossmodal_mappers"], "mappers")[1]["history"]["mappers"],
        "retriever": read_tensors(refs["attention_retriever"], "retriever")[1]["history"][
            "retriever"
        ],
    }
    model = assemble(
        category,
        cfg,
        info["extractor_ids"],
        info["dims"],
        load_norm(refs["standardisation"]),
        load_mappers(refs["crossmodal_mappers"], cfg, info["dims"]),
        banks,
        joint,
        load_retriever(refs["attention_retriever"], cfg, info["dims"]),
        (bank_info.get("theta"), bank_info.get("theta_source", "")),
        history,
    )
    shots = refs["normal_shots"].json("shots.json")["shots"]
    model.shots = [ShotRecord(**{k: s[k] for k in ShotRecord.__dataclass_fields__}) for s in shots]
    model.lineage = {stage: ref.version for stage, ref in refs.items()}
    extractors = settings.build_extractors(cfg)
    cache = FeatureCache(store.feature_cache())
    val, source = _calibration(data, store, category, {s.key for s in model.shots})
    broken = [k for k, t in model.tensors().items() if not torch.isfinite(t).all()]
    if broken:  # write the candidate anyway: the blocking finite_weights check stops it
        context.log.error(
            f"non-finite weights in {', '.join(broken)}: not calibrated, not evaluated"
        )
        source = "not calibrated: non-finite weights"
    else:
        gate_library, left_out = _gate_library(data, store, category)
        shot_samples = manifest_samples(refs["normal_shots"].json("shots.json"))
        gate_note = calibrate_and_gate(
            model,
            gate_library,
            val or shot_samples,
            source,
            extractors,
            cache,
            shot_samples,
        )
        if left_out:
            gate_note += (
                f"; it leaves out {left_out} library scan(s) that a gate passed on its own "
                "(they can still be shots)"
            )
        context.log.info(gate_note)
        if model.calibration is not None and not model.calibration.supported:
            context.log.warning(f"{category}: {model.calibration.sentence()}")
        if source == GATE_PASSED_ONLY:
            context.log.warning(
                f"{category}: the line's and the gate's thresholds come from scans a gate "
                "passed on its own (every vouched scan is a shot and there is no "
                "validation split): add validation/good scans to the dataset, or release "
                "good scans from the quarantine"
            )
    meta: dict = {
        "threshold": model.threshold,
        "gate_threshold": model.gate_threshold,
        "library_check": gate_note if not broken else "not built: non-finite weights",
        "threshold_source": source,
        "method": cfg.method,
        "shots": len(model.shots),
    }
    if model.calibration is not None:
        meta["calibration"] = model.calibration.sentence()
        meta["calibration_n"] = model.calibration.n
        meta["target_false_reject"] = model.calibration.target
        meta["target_supported"] = model.calibration.supported
        meta["expected_false_reject_bound"] = model.calibration.expected_rate
    if model.theta is not None:
        meta["theta"] = model.theta
    report, pictures = None, []
    dataset = data.dataset()
    if not broken and data.has_split(category, "test"):
        ev = evaluate(model, dataset, cache, extractors)
        report = ev.to_dict()
        samples = test_samples(dataset, category)
        v = ev.verdicts
        picks = [i for i, s in enumerate(samples) if s.label == 0][:2]
        picks += [i for i, s in enumerate(samples) if s.label == 1][
            :: max(1, ev.report.n_defective // 6)
        ][:6]
        vmax = float(np.quantile(ev.result.maps.numpy(), 0.999))
        for i in picks:
            scan = prepare_sample(samples[i], cfg.preprocess, surface=False)
            tile = overlay(scan.rgb, ev.result.maps[i].numpy(), vmax, ev.masks[i].numpy())
            verdict = v.scans[i]["verdict"]
            pictures.append(
                captioned(
                    tile,
                    f"{v.scans[i]['name']} {verdict}",
                    None if verdict == "UNKNOWN" else verdict == "FAIL",
                )
            )
        meta["metrics"] = metrics_table(report)
        meta["image_auroc"] = report["image_auroc"]
        meta["aupro_30"] = report["aupro"]["0.3"]
        meta["replacement_rate"] = report["replacement_rate"]
        meta["n_test"] = report["n_test"]
        if v.false_reject_rate is not None:
            meta["false_reject_rate"] = v.false_reject_rate
        if v.escape_rate is not None:
            meta["escape_rate"] = v.escape_rate
        if v.oracle_escape_rate is not None:
            meta["oracle_escape_rate"] = v.oracle_escape_rate
        meta["verdicts"] = dg.MetadataValue.md(v.summary().replace("\n", "  \n"))
        meta["score histogram (picture)"] = png_markdown(
            score_histogram(ev.scores, ev.defects, model.threshold, model.gate_threshold),
            "test scores by kind, with the line and gate thresholds",
        )
        meta["false rejects and escapes by threshold"] = verdict_table(
            candidate_rows(ev, model.threshold, model.gate_threshold)
        )
        meta["anomaly maps (picture)"] = png_markdown(
            gallery(pictures), "anomaly maps: 2 good parts, then defects"
        )
        meta["test_scores"] = dg.MetadataValue.table(
            [
                dg.TableRecord(
                    {
                        "scan": scan["name"],
                        "defect": scan["defect"],
                        "score": round(scan["score"], 4),
                        "verdict": scan["verdict"],
                    }
                )
                for scan in v.scans
            ],
            dg.TableSchema(
                columns=[
                    dg.TableColumn("scan", "string"),
                    dg.TableColumn("defect", "string"),
                    dg.TableColumn("score", "float"),
                    dg.TableColumn("verdict", "string"),
                ]
            ),
        )
    else:
        meta["metrics"] = "no labelled test split configured (CFRData.dataset_root): not computed"
    model.extra["metrics"] = report
    report_json = {
        "metrics": report,
        "scans": ev.verdicts.scans if report is not None else [],
        "threshold": model.threshold,
        "gate_threshold": model.gate_threshold,
        "threshold_source": source,
        "calibration": model.calibration.to_dict() if model.calibration else None,
        "theta": model.theta,
    }

    def write(folder: Path) -> None:
        extra = {
            REPORT_JSON: (json.dumps(report_json, indent=2, sort_keys=True) + "\n").encode(),
            STAGE_JSON: (folder / STAGE_JSON).read_bytes(),
        }
        save_model(model, folder, overwrite=True, extra_files=extra)

    ref = store.write_stage(category, "evaluation_report", model.lineage, cfg.to_dict(), write)
    meta["model_hash"] = verify_model(ref.folder)
    return stage_result(ref, **meta, **curves(history))


@stage_asset(
    """The **bank on the line**: a registry row (hash-chained) naming the model
folder this run evaluated, byte for byte. Only materialized when the blocking
checks on `evaluation_report` pass; a candidate identical to the deployed model
registers nothing ("unchanged"). The materialization shows the registry
version, thresholds, metrics and the audit of the deployment.""",
    deps=[evaluation_report],
    kinds=("sql",),
    group=RELEASE,
)
def deployed_bank(context: dg.AssetExecutionContext, store: CFRStore) -> dg.MaterializeResult:
    category = context.partition_key
    candidate = candidate_ref(context, store)  # re-hashed: exactly what this run evaluated
    model_hash = verify_model(candidate.folder)
    lineage_problems = verify_lineage(store.stages(), category, candidate.folder)
    if lineage_problems:
        raise dg.Failure("refusing to deploy: " + "; ".join(lineage_problems))
    meta = json.loads((candidate.folder / MODEL_JSON).read_text())
    registry = store.registry()
    live = registry.deployed(category)
    if live is not None and live.model_hash == model_hash:
        context.log.info(f"{category}: the candidate equals deployed version {live.version}")
        record, status = live, "unchanged"
    else:
        artifacts = {stage: meta["lineage"][stage] for stage in TRAINING_STAGES} | {
            "evaluation_report": candidate.version
        }
        record = registry.register(
            category=category,
            model_path=str(candidate.folder),
            model_hash=model_hash,
            artifact_hashes=artifacts,
            shot_hashes=meta["shots"],
            extractor_ids=meta["extractor_ids"],
            method_config=meta["config"],
            metrics=(meta.get("extra") or {}).get("metrics") or {},
            threshold=meta["threshold"],
            code_version=meta["code_version"],
            run_id=context.run.run_id,
            deploy=False,
        )
        status = "deployed"
    if status == "deployed":
        # live only once the full audit of the registered row passes
        try:
            record, report = audited_deploy(registry, category, record.version, "deploy")
        except AuditFailed as exc:
            raise dg.Failure(str(exc)) from exc
        context.log.info(f"deployed {category} version {record.version} ({model_hash[:12]})")
    else:
        report = audit(record, registry)
        if not report.ok:
            raise dg.Failure(str(AuditFailed(report, "confirm")))
    model = load_model(candidate.folder, verify=False)
    out = {
        "status": status,
        "version": record.version,
        "model_hash": model_hash,
        "model_folder": dg.MetadataValue.path(str(candidate.folder)),
        "threshold": record.threshold,
        "gate_threshold": model.gate_threshold,
        "library_check": gate_summary(model),
        "audit": f"PASSED ({len(report.checks)} checks)",
        "registry": registry.safe_url,
    }
    if model.calibration is not None:
        out["calibration"] = model.calibration.sentence()
        out["target_supported"] = model.calibration.supported
    if record.metrics:
        out["metrics"] = metrics_table(record.metrics)
        for key in ("false_reject_rate", "escape_rate", "oracle_escape_rate"):
            if record.metrics.get(key) is not None:
                out[key] = record.metrics[key]
    return dg.MaterializeResult(metadata=out, data_version=dg.DataVersion(model_hash))
