"""Scheduled re-fit of every category (a fan-out of run requests).

``build_schedule_from_partitioned_job`` rejects dynamic partitions, so the
schedule lists the partitions itself.
"""

import dagster as dg

from cfr_assets.partitions import CATEGORY_TAG, category_partitions
from cfr_assets.sensors import cfr_job


@dg.schedule(
    job=cfr_job,
    cron_schedule="0 3 * * 0",
    execution_timezone="UTC",
    description="Every Sunday 03:00 UTC: re-fit every category from its current shots.",
)
def weekly_refit(context: dg.ScheduleEvaluationContext):
    categories = context.instance.get_dynamic_partitions(category_partitions.name)
    if not categories:
        return dg.SkipReason("no categories yet")
    stamp = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    return [
        dg.RunRequest(run_key=f"refit:{c}:{stamp}", partition_key=c, tags={CATEGORY_TAG: c})
        for c in sorted(categories)
    ]
