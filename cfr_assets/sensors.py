"""Sensors: new landing scans → an ingest run; a changed shot library → a rebuild.

Splitting the two means a tick whose only new scans end up quarantined starts
no rebuild, and `cfr shots release` (which changes the library) starts one.
Run keys are content hashes (never wall-clock time): the same files never
trigger twice, also across restarts. Each category is evaluated on its own, so
a bad file or folder in one category never stops another; problems are logged
in the tick.
"""

import os
import time

import dagster as dg

from cfr_assets.jobs import cfr_job, ingest_job
from cfr_assets.partitions import CATEGORY_TAG, INGEST_TAG, category_partitions
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
    new_partitions, requests, notes, waiting = [], [], [], []
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
        except Exception as exc:  # a bug on one odd file must not stop every category
            context.log.exception(f"{folder}: the landing scan failed")
            notes.append(f"{folder}: the landing scan failed ({type(exc).__name__}: {exc})")
            continue
        if not fresh:
            continue
        busy = _in_flight(context.instance, category, INGEST_TAG)
        settling = _settling(folder)
        if busy or settling:  # the next tick takes everything as one batch
            waiting.append(f"{category}: {len(fresh)} new scan(s) wait ({busy or settling})")
            continue
        if category not in known:
            new_partitions.append(category)
        requests.append(
            dg.RunRequest(
                run_key=f"ingest:{category}:{content_hash(fresh)}",
                partition_key=category,
                tags={INGEST_TAG: category},
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
        else ("; ".join(waiting) if waiting else "no new scans")
        + (f" ({len(notes)} problem(s) logged)" if notes else ""),
    )


#: a landing folder whose newest file is younger than this is still being copied into:
#: its scans wait for the next tick, so a batch dropped together is one ingest
SETTLE_SECONDS = 5.0
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _in_flight(instance: dg.DagsterInstance, category: str, *tags: str) -> str:
    """'' or what is queued or running for ``category`` under any of ``tags``."""
    for tag in tags:
        runs = instance.get_runs(
            filters=dg.RunsFilter(tags={tag: category}, statuses=IN_FLIGHT), limit=1
        )
        if runs:
            kind = "an ingest" if tag == INGEST_TAG else "a rebuild"
            state = {dg.DagsterRunStatus.QUEUED: "queued", dg.DagsterRunStatus.STARTED: "running"}
            return f"{kind} run is {state.get(runs[0].status, 'starting')} ({runs[0].run_id[:8]})"
    return ""


def _settling(folder) -> str:
    """'' or why ``folder``'s files look like a copy still in progress."""
    settle = float(os.environ.get("CFR_LANDING_SETTLE_SECONDS", "") or SETTLE_SECONDS)
    newest = 0.0
    for path in folder.iterdir():
        try:  # a scanner's temporary file may be renamed away between listing and stat
            # ctime: when the file arrived here, also for copies that keep their mtime
            st = path.stat()
            newest = max(newest, st.st_mtime, st.st_ctime)
        except OSError:
            return "files still arriving (one vanished while listed)"
    age = max(0.0, time.time() - newest)  # a clock ahead (a share) must not wait forever
    if newest > time.time() + 60:
        return ""
    return f"files still arriving (the newest {age:.0f} s ago)" if age < settle else ""


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
    requests, notes, waiting = [], [], []
    for category in sorted(context.instance.get_dynamic_partitions(category_partitions.name)):
        busy = _in_flight(context.instance, category, INGEST_TAG, CATEGORY_TAG)
        if busy:  # rebuild once the batch is in and the last rebuild is done, never midway
            waiting.append(f"{category}: {busy}")
            continue
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
        skip_reason=None
        if requests
        else "; ".join(waiting) or "every deployed model was built from its current library",
    )
