"""Sensors: new landing scans → an ingest run; a changed shot library → a rebuild.

Splitting the two means a tick whose only new scans end up quarantined starts
no rebuild, and `cfr shots release` (which changes the library) starts one.
Run keys are content hashes (never wall-clock time): the same files never
trigger twice, also across restarts. Each category is evaluated on its own, so
a bad file or folder in one category never stops another; problems are logged
in the tick.
"""

import dagster as dg

from cfr_assets.jobs import cfr_job, ingest_job
from cfr_assets.partitions import CATEGORY_TAG, category_partitions
from cfr_assets.resources import CFRData, CFRStore
from cfr_core.data.landing import content_hash, scan_landing
from cfr_core.errors import CFRError
from cfr_core.paths import is_safe_name


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches <landing>/<category>/ for new <name>.png + <name>.tiff pairs and "
    "starts an ingest run of that category (adding the category when it is new).",
)
def landing_sensor(
    context: dg.SensorEvaluationContext, data: CFRData, store: CFRStore
) -> dg.SensorResult:
    landing = data.landing_dir()
    if not landing.is_dir():
        return dg.SensorResult(skip_reason=f"landing folder {landing} does not exist yet")
    library = store.library()
    known = set(context.instance.get_dynamic_partitions(category_partitions.name))
    new_partitions, requests, notes = [], [], []
    for folder in sorted(p for p in landing.iterdir() if not p.name.startswith(".")):
        category = folder.name
        if folder.is_symlink() or not folder.is_dir():
            notes.append(f"{folder}: not a category folder (symbolic links are refused)")
            continue
        if not is_safe_name(category):
            notes.append(f"{folder}: unsafe category folder name, ignored")
            continue
        try:
            scans, problems = scan_landing(folder, category)
            notes += [f"{p.path}: {p.reason}" for p in problems]
            fresh = [
                s
                for s in scans
                if not library.contains(category, s.content_id)
                and not library.quarantined(category, s.content_id)
            ]
        except (CFRError, OSError) as exc:  # this category only
            notes.append(f"{folder}: {exc}")
            continue
        if not fresh:
            continue
        if category not in known:
            new_partitions.append(category)
        requests.append(
            dg.RunRequest(
                run_key=f"ingest:{category}:{content_hash(fresh)}",
                partition_key=category,
                tags={CATEGORY_TAG: category},
            )
        )
    for note in notes:
        context.log.warning(f"not ingested: {note}")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[category_partitions.build_add_request(new_partitions)]
        if new_partitions
        else [],
        skip_reason=None
        if requests
        else "no new scans" + (f" ({len(notes)} problem(s) logged)" if notes else ""),
    )


def deployed_pool_hash(store: CFRStore, category: str) -> str | None:
    """The pool hash the deployed model of ``category`` was chosen from (None: nothing deployed)."""
    from cfr_core.io.artifacts import read_json

    record = store.registry().deployed(category)
    if record is None:
        return None
    lineage = read_json(f"{record.model_path}/model.json", "model.json").get("lineage", {})
    shots = store.open_stage(category, "normal_shots", lineage["normal_shots"])
    return shots.json("shots.json").get("pool_hash")


@dg.sensor(
    job=cfr_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts a rebuild of a category when its shot library differs from the one "
    "its deployed model was built from (new accepted or released scans).",
)
def library_sensor(context: dg.SensorEvaluationContext, store: CFRStore) -> dg.SensorResult:
    library = store.library()
    requests, notes = [], []
    for category in sorted(context.instance.get_dynamic_partitions(category_partitions.name)):
        try:
            pool = library.pool_hash(category)
            if not pool or pool == deployed_pool_hash(store, category):
                continue
        except (CFRError, OSError, KeyError) as exc:  # this category only
            notes.append(f"{category}: {exc}")
            continue
        requests.append(
            dg.RunRequest(
                run_key=f"rebuild:{category}:{pool}",
                partition_key=category,
                tags={CATEGORY_TAG: category},
            )
        )
    for note in notes:
        context.log.warning(note)
    return dg.SensorResult(
        run_requests=requests,
        skip_reason=None if requests else "every deployed model was built from its current library",
    )
