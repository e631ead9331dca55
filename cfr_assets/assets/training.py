"""shot_features → crossmodal_mappers → memory_banks → attention_retriever.

Each stage calls cfr_core, writes its own safetensors + JSON through the store
(content-addressed version folders, never the pickling IO manager) and returns
the content hash as its data version.
"""

import json
from pathlib import Path

import dagster as dg
import torch
from safetensors.torch import load_file, save_file

from cfr_assets.assets.shots import manifest_samples, normal_shots
from cfr_assets.partitions import stage_asset
from cfr_assets.pictures import loss_plot, png_markdown
from cfr_assets.resources import CFRModelSettings, CFRStore
from cfr_core.engine.features import FeatureCache, FeatureSet, extract_features
from cfr_core.engine.fit import standardize
from cfr_core.engine.normalize import FeatureNorm
from cfr_core.engine.train import train_mappers, train_retriever
from cfr_core.memory.bank import Banks, build_banks, build_joint_bank


def _result(pointer: dict, **meta) -> dg.MaterializeResult:
    meta["artifact_folder"] = dg.MetadataValue.path(pointer["folder"])
    meta["sha256"] = pointer["version"]
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(pointer["version"]))


def _file(pointer: dict, name: str) -> Path:
    return Path(pointer["files"][name][0])


def load_shot_features(store: CFRStore, category: str) -> tuple[FeatureSet, dict]:
    pointer = store.read_stage(category, "shot_features")
    t = load_file(str(_file(pointer, "features.safetensors")))
    info = json.loads(_file(pointer, "features.json").read_text())
    return FeatureSet(t["rgb"], t["points"], t["masks"].bool(), info["keys"]), info


def write_tensor_stage(
    store: CFRStore,
    category: str,
    stage: str,
    name: str,
    tensors: dict[str, torch.Tensor],
    info: dict,
) -> dict:
    """``<name>.safetensors`` (a placeholder when the method needs nothing here) + ``<name>.json``."""

    def write(folder: Path) -> None:
        save_file(tensors or {"empty": torch.zeros(1)}, str(folder / f"{name}.safetensors"))
        (folder / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")

    return store.write_stage(category, stage, write)


def _epoch_logger(context: dg.AssetExecutionContext):
    """Training progress in the run log: every tenth epoch and the last one."""

    def log(stage: str, epoch: int, epochs: int, loss: float) -> None:
        if epoch == epochs or epoch % max(1, epochs // 10) == 0:
            context.log.info(f"{stage}: epoch {epoch}/{epochs}, loss {loss:.4f}")

    return log


def standardized(store: CFRStore, category: str, feats: FeatureSet) -> FeatureSet:
    """``feats`` with the standardisation fitted by crossmodal_mappers (if any) applied."""
    norm = FeatureNorm.from_tensors(
        load_tensors(store, category, "crossmodal_mappers", "mappers.safetensors")
    )
    return feats if norm is None else norm.apply(feats)


def load_tensors(store: CFRStore, category: str, stage: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(_file(store.read_stage(category, stage), name)))


@stage_asset(
    "Frozen per-pixel RGB and 3D features of the shots (cached per file hash and extractor).",
    deps=[normal_shots],
)
def shot_features(context: dg.AssetExecutionContext, settings: CFRModelSettings, store: CFRStore):
    category = context.partition_key
    manifest = json.loads(
        _file(store.read_stage(category, "normal_shots"), "shots.json").read_text()
    )
    samples = manifest_samples(manifest)
    cfg = settings.fit_config(shots=len(samples))
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

    def write(folder: Path) -> None:
        save_file(
            {
                "rgb": feats.rgb.contiguous(),
                "points": feats.points.contiguous(),
                "masks": feats.masks.to(torch.uint8).contiguous(),
            },
            str(folder / "features.safetensors"),
        )
        (folder / "features.json").write_text(json.dumps(info, indent=2) + "\n")

    pointer = store.write_stage(category, "shot_features", write)
    return _result(
        pointer,
        shots=len(samples),
        grid=cfg.extractors.grid,
        rgb_extractor=info["extractor_ids"]["rgb"],
        points_extractor=info["extractor_ids"]["points"],
        foreground_share=float(feats.foreground.float().mean()),
    )


@stage_asset(
    "Crossmodal mappers 3D→RGB and RGB→3D (CFR: cyclic GeGLU) and the feature standardisation.",
    deps=[shot_features],
)
def crossmodal_mappers(
    context: dg.AssetExecutionContext, settings: CFRModelSettings, store: CFRStore
):
    category = context.partition_key
    feats, _ = load_shot_features(store, category)
    cfg = settings.fit_config(shots=len(feats))
    norm, feats = standardize(cfg, feats)
    tensors: dict[str, torch.Tensor] = dict(norm.tensors()) if norm else {}
    history: dict[str, list[float]] = {}
    if cfg.uses_mappers:
        mappers, hist = train_mappers(feats, cfg.mappers, _epoch_logger(context), settings.device)
        tensors.update({f"mappers.{k}": v.contiguous() for k, v in mappers.state_dict().items()})
        history["mappers"] = hist.losses

    pointer = write_tensor_stage(
        store,
        category,
        "crossmodal_mappers",
        "mappers",
        tensors,
        {"history": history, "method": cfg.method},
    )
    meta = {
        "method": cfg.method,
        "kind": cfg.mappers.kind,
        "cyclic": cfg.mappers.cyclic,
        "standardized": norm is not None,
    }
    if history:
        meta["final_loss"] = history["mappers"][-1]
        meta["loss_curve"] = png_markdown(loss_plot(history), "mapper loss")
    else:
        meta["note"] = f"{cfg.method} uses no mappers"
    return _result(pointer, **meta)


@stage_asset(
    "RGB bank and 3D→RGB key-value bank (greedy 10 % coreset); the joint bank for btf.",
    deps=[crossmodal_mappers],
)
def memory_banks(context: dg.AssetExecutionContext, settings: CFRModelSettings, store: CFRStore):
    category = context.partition_key
    feats, _ = load_shot_features(store, category)
    cfg = settings.fit_config(shots=len(feats))
    feats = standardized(store, category, feats)
    tensors: dict[str, torch.Tensor] = {}
    if cfg.method == "btf":
        tensors["bank.joint"] = build_joint_bank(
            feats.rgb, feats.points, feats.foreground, cfg.banks
        )
    elif cfg.replacement is not None:
        tensors.update(build_banks(feats.rgb, feats.points, cfg.banks).tensors())

    pointer = write_tensor_stage(
        store, category, "memory_banks", "banks", tensors, {"method": cfg.method}
    )
    sizes = {k: list(v.shape) for k, v in tensors.items()}
    return _result(
        pointer,
        banks=dg.MetadataValue.json(sizes or {"note": f"{cfg.method} needs no bank"}),
        entries=int(sum(v.shape[0] for v in tensors.values())),
    )


@stage_asset(
    "Attention retriever (top-3 keys, d_model 128) trained to predict real RGB features.",
    deps=[memory_banks],
)
def attention_retriever(
    context: dg.AssetExecutionContext, settings: CFRModelSettings, store: CFRStore
):
    category = context.partition_key
    feats, _ = load_shot_features(store, category)
    cfg = settings.fit_config(shots=len(feats))
    tensors: dict[str, torch.Tensor] = {}
    history: dict[str, list[float]] = {}
    if cfg.replacement == "attention":
        feats = standardized(store, category, feats)
        b = load_tensors(store, category, "memory_banks", "banks.safetensors")
        retriever, hist = train_retriever(
            feats,
            Banks(b["bank.rgb"], b["bank.keys"], b["bank.values"]),
            cfg.retriever,
            _epoch_logger(context),
        )
        tensors = {f"retriever.{k}": v.contiguous() for k, v in retriever.state_dict().items()}
        history["retriever"] = hist.losses

    pointer = write_tensor_stage(
        store,
        category,
        "attention_retriever",
        "retriever",
        tensors,
        {"history": history, "method": cfg.method},
    )
    meta = {}
    if history:
        meta = {
            "final_loss": history["retriever"][-1],
            "loss_curve": png_markdown(loss_plot(history), "loss"),
        }
    else:
        meta = {"note": f"{cfg.method} uses no attention retriever"}
    return _result(pointer, **meta)
