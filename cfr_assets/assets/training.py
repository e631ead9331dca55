"""shot_features → standardisation → crossmodal_mappers → memory_banks → attention_retriever.

Each stage calls the same staged function of cfr_core.engine.fit that `cfr fit`
calls, reads exactly the upstream versions of its own run (cfr_assets.handoff),
and writes its own safetensors + JSON into a content-addressed version folder
whose ``stage.json`` names those upstream versions and the config.
"""

import json
from pathlib import Path

import dagster as dg
import torch
from safetensors.torch import load_file, save_file

from cfr_assets.assets.shots import normal_shots, stage_result
from cfr_assets.handoff import upstream
from cfr_assets.partitions import stage_asset
from cfr_assets.pictures import loss_plot, loss_table, png_markdown
from cfr_assets.resources import CFRModelSettings, CFRStore, StageRef
from cfr_core.config import FitConfig
from cfr_core.data.mvtec import manifest_samples
from cfr_core.engine.features import FeatureCache, FeatureSet, extract_features
from cfr_core.engine.fit import (
    fit_banks,
    fit_mappers,
    fit_retriever,
    fit_standardisation,
    fit_theta,
    standardised,
)
from cfr_core.engine.normalize import FeatureNorm
from cfr_core.io.artifacts import ArtifactError
from cfr_core.memory.bank import Banks
from cfr_core.models.mappers import CrossModalMappers
from cfr_core.models.retriever import AttentionRetriever


def write_tensors(folder: Path, name: str, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """``<name>.safetensors`` (a placeholder when the method needs nothing here) + ``<name>.json``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors or {"empty": torch.zeros(1)}, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def read_tensors(ref: StageRef, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    path = ref.file(f"{name}.safetensors")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types on a damaged file
        raise ArtifactError(f"{name}.safetensors does not load ({exc})", path) from exc
    tensors.pop("empty", None)
    return tensors, ref.json(f"{name}.json")


def run_config(settings: CFRModelSettings, ref: StageRef) -> FitConfig:
    """The run's config, checked against the one the upstream stage was built with."""
    stored = FitConfig.from_dict(ref.json("stage.json")["config"])
    cfg = settings.fit_config()
    if stored != cfg:
        raise dg.Failure(
            f"{ref.stage} version {ref.version[:12]} was built with another configuration; "
            "rerun the whole job"
        )
    return cfg


def load_features(ref: StageRef) -> tuple[FeatureSet, dict]:
    t, info = read_tensors(ref, "features")
    return FeatureSet(t["rgb"], t["points"], t["masks"].bool(), info["keys"]), info


def load_norm(ref: StageRef) -> FeatureNorm | None:
    return FeatureNorm.from_tensors(read_tensors(ref, "norm")[0])


def load_mappers(ref: StageRef, cfg: FitConfig, dims: dict) -> CrossModalMappers | None:
    tensors, _ = read_tensors(ref, "mappers")
    if not tensors:
        return None
    mappers = CrossModalMappers(dims["rgb"], dims["points"], cfg.mappers)
    mappers.load_state_dict({k.removeprefix("mappers."): v for k, v in tensors.items()})
    return mappers.eval()


def load_banks(ref: StageRef) -> tuple[Banks | None, torch.Tensor | None, dict]:
    t, info = read_tensors(ref, "banks")
    banks = Banks(t["bank.rgb"], t["bank.keys"], t["bank.values"]) if "bank.rgb" in t else None
    return banks, t.get("bank.joint"), info


def load_retriever(ref: StageRef, cfg: FitConfig, dims: dict) -> AttentionRetriever | None:
    tensors, _ = read_tensors(ref, "retriever")
    if not tensors:
        return None
    r = AttentionRetriever(dims["points"], dims["rgb"], cfg.retriever.d_model, cfg.retriever.top_k)
    r.load_state_dict({k.removeprefix("retriever."): v for k, v in tensors.items()})
    return r.eval()


def epoch_logger(context: dg.AssetExecutionContext):
    """Training progress in the run log: every tenth epoch and the last one."""

    def log(stage: str, epoch: int, epochs: int, loss: float) -> None:
        if epoch == epochs or epoch % max(1, epochs // 10) == 0:
            context.log.info(f"{stage}: epoch {epoch}/{epochs}, loss {loss:.4f}")

    return log


def curves(history: dict[str, list[float]]) -> dict:
    """Loss curves as a table (shown without a click) and as a picture (behind a click)."""
    if not any(history.values()):
        return {}
    return {
        "loss_curve": loss_table(history),
        "loss_curve (picture)": png_markdown(loss_plot(history), "loss per epoch"),
    }


@stage_asset(
    """Frozen per-pixel **RGB and 3D features** of the shots, on the feature grid
(cached per file hash, extractor lineage id and preprocessing).""",
    deps=[normal_shots],
)
def shot_features(
    context: dg.AssetExecutionContext, settings: CFRModelSettings, store: CFRStore
) -> dg.MaterializeResult:
    category = context.partition_key
    shots = upstream(context, store, "normal_shots")
    cfg = run_config(settings, shots)
    manifest = shots.json("shots.json")
    samples = manifest_samples(manifest)
    extractors = settings.build_extractors(cfg)
    feats = extract_features(
        samples, extractors, cfg.preprocess, FeatureCache(store.feature_cache())
    )
    info = {
        "keys": feats.keys,
        "extractor_ids": {"rgb": extractors[0].lineage_id, "points": extractors[1].lineage_id},
        "dims": {"rgb": feats.rgb.shape[1], "points": feats.points.shape[1]},
        "shots": manifest["shots"],
    }
    tensors = {"rgb": feats.rgb, "points": feats.points, "masks": feats.masks.to(torch.uint8)}
    ref = store.write_stage(
        category,
        "shot_features",
        {"normal_shots": shots.version},
        cfg.to_dict(),
        lambda d: write_tensors(d, "features", tensors, info),
    )
    return stage_result(
        ref,
        shots=len(samples),
        grid=cfg.extractors.grid,
        rgb_extractor=info["extractor_ids"]["rgb"],
        points_extractor=info["extractor_ids"]["points"],
        foreground_share=float(feats.foreground.float().mean()),
    )


@stage_asset(
    """Per-category **feature standardisation** (mean and spread of the shots'
foreground features), its own recorded artifact; an explicit "none" when the
extractor preset does not standardise.""",
    deps=[shot_features],
)
def standardisation(
    context: dg.AssetExecutionContext, settings: CFRModelSettings, store: CFRStore
) -> dg.MaterializeResult:
    feats_ref = upstream(context, store, "shot_features")
    cfg = run_config(settings, feats_ref)
    feats, _ = load_features(feats_ref)
    norm = fit_standardisation(cfg, feats)
    ref = store.write_stage(
        context.partition_key,
        "standardisation",
        {"shot_features": feats_ref.version},
        cfg.to_dict(),
        lambda d: write_tensors(
            d, "norm", norm.tensors() if norm else {}, {"standardised": norm is not None}
        ),
    )
    return stage_result(ref, standardised=norm is not None)


@stage_asset(
    """**Crossmodal mappers** 3D→RGB and RGB→3D (CFR: cyclic GeGLU with four
`1 - cos` terms; CFM: 3-layer MLPs with the two direct terms), trained on the
shots' standardised foreground features.""",
    deps=[standardisation],
)
def crossmodal_mappers(
    context: dg.AssetExecutionContext, settings: CFRModelSettings, store: CFRStore
) -> dg.MaterializeResult:
    feats_ref = upstream(context, store, "shot_features")
    norm_ref = upstream(context, store, "standardisation")
    cfg = run_config(settings, norm_ref)
    feats, _ = load_features(feats_ref)
    feats = standardised(load_norm(norm_ref), feats)
    mappers, losses, seconds = fit_mappers(cfg, feats, epoch_logger(context), settings.device)
    tensors = (
        {} if mappers is None else {f"mappers.{k}": v for k, v in mappers.state_dict().items()}
    )
    ref = store.write_stage(
        context.partition_key,
        "crossmodal_mappers",
        {"shot_features": feats_ref.version, "standardisation": norm_ref.version},
        cfg.to_dict(),
        lambda d: write_tensors(d, "mappers", tensors, {"history": {"mappers": losses}}),
    )
    meta = {"kind": cfg.mappers.kind, "cyclic": cfg.mappers.cyclic, "train_seconds": seconds}
    if losses:
        meta["final_loss"] = losses[-1]
    else:
        meta["note"] = f"{cfg.method} uses no mappers"
    return stage_result(ref, **meta, **curves({"mappers": losses}))


@stage_asset(
    """**Memory banks**: the RGB bank and the 3D→RGB key-value bank (greedy 10 %
coreset of every shot pixel), or BTF's joint bank; and the replacement
threshold θ (the paper's fixed value, or calibrated from the shots).""",
    deps=[crossmodal_mappers],
)
def memory_banks(
    context: dg.AssetExecutionContext, settings: CFRModelSettings, store: CFRStore
) -> dg.MaterializeResult:
    feats_ref = upstream(context, store, "shot_features")
    norm_ref = upstream(context, store, "standardisation")
    mappers_ref = upstream(context, store, "crossmodal_mappers")
    cfg = run_config(settings, mappers_ref)
    feats, info = load_features(feats_ref)
    feats = standardised(load_norm(norm_ref), feats)
    banks, joint, seconds = fit_banks(cfg, feats)
    theta, theta_source = fit_theta(cfg, feats, load_mappers(mappers_ref, cfg, info["dims"]), banks)
    tensors = banks.tensors() if banks is not None else {}
    if joint is not None:
        tensors["bank.joint"] = joint
    sizes = {k: list(v.shape) for k, v in tensors.items()}
    ref = store.write_stage(
        context.partition_key,
        "memory_banks",
        {
            "shot_features": feats_ref.version,
            "standardisation": norm_ref.version,
            "crossmodal_mappers": mappers_ref.version,
        },
        cfg.to_dict(),
        lambda d: write_tensors(
            d, "banks", tensors, {"sizes": sizes, "theta": theta, "theta_source": theta_source}
        ),
    )
    meta = {
        "banks": dg.MetadataValue.json(sizes or {"note": f"{cfg.method} needs no bank"}),
        "entries": int(sum(v[0] for v in sizes.values())),
        "coreset_seconds": seconds,
    }
    if theta is not None:
        meta["theta"] = theta
        meta["theta_source"] = theta_source
    return stage_result(ref, **meta)


@stage_asset(
    """**Attention retriever** (top-3 keys by cosine, d_model 128) trained to
predict a shot pixel's real RGB feature from its 3D feature; it replaces the
unreliable 3D→RGB reconstructions at inference.""",
    deps=[memory_banks],
)
def attention_retriever(
    context: dg.AssetExecutionContext, settings: CFRModelSettings, store: CFRStore
) -> dg.MaterializeResult:
    feats_ref = upstream(context, store, "shot_features")
    norm_ref = upstream(context, store, "standardisation")
    banks_ref = upstream(context, store, "memory_banks")
    cfg = run_config(settings, banks_ref)
    feats, _ = load_features(feats_ref)
    feats = standardised(load_norm(norm_ref), feats)
    banks, _, _ = load_banks(banks_ref)
    retriever, losses, seconds = fit_retriever(cfg, feats, banks, epoch_logger(context))
    tensors = (
        {}
        if retriever is None
        else {f"retriever.{k}": v for k, v in retriever.state_dict().items()}
    )
    ref = store.write_stage(
        context.partition_key,
        "attention_retriever",
        {
            "shot_features": feats_ref.version,
            "standardisation": norm_ref.version,
            "memory_banks": banks_ref.version,
        },
        cfg.to_dict(),
        lambda d: write_tensors(d, "retriever", tensors, {"history": {"retriever": losses}}),
    )
    meta = {"train_seconds": seconds}
    if losses:
        meta["final_loss"] = losses[-1]
    else:
        meta["note"] = f"{cfg.method} uses no attention retriever"
    return stage_result(ref, **meta, **curves({"retriever": losses}))
