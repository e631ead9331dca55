"""Run one category's job in this process, on the Dagster instance in DAGSTER_HOME.

What `cfr pipeline run` and `cfr demo` use: the run is a real run of
``cfr_category_job`` (named so in the UI), holds the category lock like any
other run, and reports whether it deployed a new version, found the candidate
unchanged, or failed, and why.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import dagster as dg

from cfr_assets.definitions import build_definitions
from cfr_assets.launcher import HOST_TAG, PID_TAG
from cfr_assets.partitions import CATEGORY_TAG, INGEST_TAG, category_partitions
from cfr_assets.resources import INGEST_JOB
from cfr_core.errors import CFRError
from cfr_core.paths import check_name


@dataclass
class RunOutcome:
    category: str
    run_id: str
    success: bool
    status: str  # deployed, unchanged, ingested or failed
    version: int | None
    message: str
    interrupted: bool = False  # Ctrl-C (SIGINT) stopped the run


#: what Dagster raises in a step when the process is interrupted (it installs its own
#: SIGINT handler while a run executes in process)
INTERRUPTED = "DagsterExecutionInterruptedError"


def _interrupted(result: dg.ExecuteInProcessResult) -> bool:
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.STEP_FAILURE:
            err = event.step_failure_data.error
            while err is not None:
                if err.cls_name == INTERRUPTED:
                    return True
                err = err.cause
    return False


def _failure(result: dg.ExecuteInProcessResult) -> str:
    failed = [
        e
        for e in result.get_asset_check_evaluations()
        if not e.passed and e.severity == dg.AssetCheckSeverity.ERROR  # WARN does not block
    ]
    if failed:
        details = []
        for e in failed:
            meta = {k: getattr(v, "value", v) for k, v in e.metadata.items()}
            why = next(
                (
                    meta[k]
                    for k in ("regressions", "problems", "non_finite", "summary")
                    if k in meta
                ),
                "",
            )
            details.append(f"{e.check_name} ({why})" if why else e.check_name)
        return "blocking check failed, nothing deployed: " + "; ".join(details)
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.STEP_FAILURE:
            err = event.step_failure_data.error
            while err.cause is not None and "Error occurred while" in err.message:
                err = err.cause
            return f"{event.step_key}: {err.message.strip()}"
    for event in result.all_events:
        if event.event_type in (dg.DagsterEventType.RUN_FAILURE, dg.DagsterEventType.ENGINE_EVENT):
            data = event.event_specific_data
            error = getattr(data, "error", None)
            if error is not None:
                while error.cause is not None:
                    error = error.cause
                return error.message.strip()
    return "the run failed (see the run's logs in the UI)"


def known_categories(instance: dg.DagsterInstance, resources: dict) -> set[str]:
    """The categories a run may name: partitions already made, folders of the landing
    root, categories with library scans, and categories of the labelled dataset."""
    known = set(instance.get_dynamic_partitions(category_partitions.name))
    data, store = resources["data"], resources["store"]
    roots = [data.landing_dir(), data.dataset()]
    for root in (*roots, store.library().root / "library"):
        if root is not None and root.is_dir():
            known |= {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return known


def check_known(category: str, instance: dg.DagsterInstance, resources: dict) -> None:
    """A misspelt category is refused in one line; it never becomes a partition."""
    known = known_categories(instance, resources)
    if category in known:
        return
    from difflib import get_close_matches

    near = get_close_matches(category, sorted(known), n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    raise CFRError(
        f"unknown category {category!r}: {hint}no partition, landing folder, library scans "
        f"or dataset category has that name (known: {', '.join(sorted(known)) or 'none'}); "
        f"to start a new one, create {resources['data'].landing_dir() / category} and drop its "
        "good scans there"
    )


def run_category(
    category: str,
    instance: dg.DagsterInstance,
    resources: dict,
    job: str = "cfr_category_job",
    log_level: str = "INFO",
) -> RunOutcome:
    """Materialize ``category`` with ``job`` in process; add the partition if it is new."""
    check_name(category)
    if category not in instance.get_dynamic_partitions(category_partitions.name):
        instance.add_dynamic_partitions(category_partitions.name, [category])
    result = (
        build_definitions(resources)
        .resolve_job_def(job)
        .execute_in_process(
            partition_key=category,
            instance=instance,
            tags={
                (INGEST_TAG if job == INGEST_JOB else CATEGORY_TAG): category,
                HOST_TAG: socket.gethostname(),  # so that run monitoring can tell
                PID_TAG: str(os.getpid()),  # when this process dies mid-run
            },
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        )
    )
    if not result.success:
        return RunOutcome(
            category,
            result.run_id,
            False,
            "interrupted" if _interrupted(result) else "failed",
            None,
            _failure(result),
            interrupted=_interrupted(result),
        )
    for mat in result.get_asset_materialization_events():
        m = mat.step_materialization_data.materialization
        if m.asset_key == dg.AssetKey("deployed_bank"):
            meta = m.metadata
            status, version = meta["status"].value, meta["version"].value
            return RunOutcome(
                category, result.run_id, True, status, version, f"{status} v{version}"
            )
    return RunOutcome(category, result.run_id, True, "ingested", None, "ingested new scans")
