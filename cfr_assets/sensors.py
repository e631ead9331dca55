"""Landing-folder sensor: new good scans → (new partition) → a rebuild of that category.

The run key is the content hash of the scans not yet in the library, so the
same files never trigger twice (also across restarts: Dagster keeps run keys),
and nothing depends on wall-clock time. Bad files are reported, left in place.
"""

import dagster as dg

from cfr_assets.partitions import CATEGORY_TAG, category_partitions
from cfr_assets.resources import CFRData, CFRStore
from cfr_core.data.landing import content_hash, scan_landing
from cfr_core.data.mvtec import is_safe_name

cfr_job = dg.define_asset_job(
    "cfr_category_job",
    selection=dg.AssetSelection.groups("cfr"),
    description="Rebuild one category: shots → features → mappers → banks → retriever → evaluation → deployment.",
)


@dg.sensor(
    job=cfr_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches <landing>/<category>/ for new <name>.png + <name>.tiff pairs.",
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
    for folder in sorted(p for p in landing.iterdir() if p.is_dir() and not p.name.startswith(".")):
        category = folder.name
        if not is_safe_name(category):
            notes.append(f"{folder}: unsafe category folder name, ignored")
            continue
        scans, problems = scan_landing(folder, category)
        notes += [f"{p.path}: {p.reason}" for p in problems]
        fresh = [
            s
            for s in scans
            if not library.contains(category, s.content_id)
            and not library.quarantined(category, s.content_id)
        ]
        if not fresh:
            continue
        if category not in known:
            new_partitions.append(category)
        requests.append(
            dg.RunRequest(
                run_key=f"{category}:{content_hash(fresh)}",
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
        else "no new scans" + (f" ({len(notes)} problem(s) reported)" if notes else ""),
    )
