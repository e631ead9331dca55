"""Run-scoped hand-off: each stage reads exactly the upstream versions its own run produced.

There is no mutable "latest" pointer. A stage records the version it wrote in
its materialization's metadata (``stage_version``); a downstream stage of the
same run finds it in this run's event log. A run re-executed from a failure
(Dagster's "re-execute from failure") finds the stages its parent run already
finished by walking ``parent_run_id``. A run that materializes only part of
the graph must name the upstream versions it builds on, as run tags
``cfr/use/<stage>=<version>``; otherwise the stage fails with a message that
says so. Two runs of one category can therefore never mix their artifacts,
whatever runs at the same time.
"""

from __future__ import annotations

import dagster as dg

from cfr_assets.resources import CFRStore, StageRef

VERSION_KEY = "stage_version"
USE_TAG = "cfr/use/"


def _run_versions(instance: dg.DagsterInstance, run_id: str, category: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        mat = entry.dagster_event.event_specific_data.materialization
        version = mat.metadata.get(VERSION_KEY)
        if mat.partition == category and version is not None:
            found[mat.asset_key.path[-1]] = version.value
    return found


def run_versions(context) -> dict[str, str]:
    """stage -> version produced for the context's category by its run or the runs it re-executes."""
    instance, category = context.instance, context.partition_key
    run = context.run
    versions: dict[str, str] = {}
    seen = set()
    while run is not None and run.run_id not in seen:
        seen.add(run.run_id)
        for stage, version in _run_versions(instance, run.run_id, category).items():
            versions.setdefault(stage, version)
        run = instance.get_run_by_id(run.parent_run_id) if run.parent_run_id else None
    for key, value in context.run.tags.items():
        if key.startswith(USE_TAG):
            versions.setdefault(key.removeprefix(USE_TAG), value)
    return versions


def upstream(context, store: CFRStore, stage: str) -> StageRef:
    """The version of ``stage`` that this run produced (checked on disk before use)."""
    version = run_versions(context).get(stage)
    if version is None:
        raise dg.Failure(
            f"{stage} of {context.partition_key!r} was not materialized in this run "
            f"({context.run.run_id[:8]}): run the whole `cfr_category_job` for the category "
            f"(`cfr pipeline run {context.partition_key}`), re-execute this run from its failure, "
            f"or name the version to build on with the run tag {USE_TAG}{stage}=<version>"
        )
    return store.open_stage(context.partition_key, stage, version)
