"""normal_shots: the shots of this rebuild, chosen from the shot library by the few-shot protocol."""

import json

import dagster as dg

from cfr_assets.assets.library import shot_library
from cfr_assets.handoff import VERSION_KEY
from cfr_assets.partitions import stage_asset
from cfr_assets.resources import CFRData, CFRModelSettings, CFRStore, StageRef
from cfr_core.data.mvtec import Sample, index_category
from cfr_core.engine.fit import choose_shots, shot_records
from cfr_core.errors import CFRError


def stage_result(ref: StageRef, **meta) -> dg.MaterializeResult:
    """A stage's materialization: its version (what downstream stages of the run read), folder, metadata."""
    meta[VERSION_KEY] = ref.version
    meta["artifact_folder"] = dg.MetadataValue.path(str(ref.folder))
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(ref.version))


def _file_name(store: CFRStore, category: str, sample: Sample) -> str:
    """The name the operator gave the scan (library scans), else the dataset file name."""
    library = store.library()
    if not sample.rgb_path.resolve().is_relative_to(library.root.resolve()):
        return sample.rgb_path.name  # a dataset scan
    try:
        return library.info(category, sample.stem).get("name", sample.stem)
    except CFRError:
        return sample.stem


@stage_asset(
    """**Shots** of this rebuild: the few-shot protocol (sorted pool,
`default_rng(seed).choice(N, k)`) applied to the accepted scans of the shot
library (and the dataset's train/good scans when `use_dataset_train` is set).
`shots.json` records every shot's operator file name, path and sha256 and the
hash of the pool it was chosen from.""",
    deps=[shot_library],
    kinds=("python", "json"),
)
def normal_shots(
    context: dg.AssetExecutionContext, data: CFRData, settings: CFRModelSettings, store: CFRStore
) -> dg.MaterializeResult:
    category = context.partition_key
    library = store.library()
    pool = library.samples(category)
    dataset = data.dataset()
    if data.use_dataset_train and data.has_split(category, "train"):
        pool += index_category(dataset, category).split("train")
    if not pool:
        raise dg.Failure(
            f"no normal scans for {category!r}: drop <name>.png + <name>.tiff pairs into "
            f"{data.landing_dir() / category}"
        )
    cfg = settings.fit_config()
    selection = choose_shots(pool, cfg)
    records = shot_records(selection.samples)
    manifest = {
        "category": category,
        "seed": selection.seed,
        "pool": [s.key for s in pool],
        "pool_hash": library.pool_hash(category),
        "shots": [
            {
                **vars(r),
                "stem": s.stem,
                "file": _file_name(store, category, s),
            }
            for r, s in zip(records, selection.samples, strict=True)
        ],
    }
    ref = store.write_stage(
        category,
        "normal_shots",
        {},
        cfg.to_dict(),
        lambda d: (d / "shots.json").write_text(json.dumps(manifest, indent=2) + "\n"),
    )
    table = dg.MetadataValue.table(
        [
            dg.TableRecord(
                {
                    "file": s["file"],
                    "rgb sha256": s["rgb_sha256"][:16],
                    "xyz sha256": s["xyz_sha256"][:16],
                }
            )
            for s in manifest["shots"]
        ],
        dg.TableSchema(
            columns=[
                dg.TableColumn("file", "string"),
                dg.TableColumn("rgb sha256", "string"),
                dg.TableColumn("xyz sha256", "string"),
            ]
        ),
    )
    return stage_result(
        ref,
        pool_size=len(pool),
        shots=len(records),
        shot_table=table,
        pool_hash=manifest["pool_hash"],
    )
