"""Scheduled re-fit of every category (a fan-out of run requests).

``build_schedule_from_partitioned_job`` rejects dynamic partitions, so the
schedule lists the partitions itself. Off by default: turn it on in the UI
(Automation → weekly_refit) or with `dagster schedule start weekly_refit`. A
re-fit whose inputs, config, code and weights equal the deployed model's
registers nothing new.
"""

import dagster as dg

from cfr_assets.jobs import cfr_job, line_job
from cfr_assets.partitions import CATEGORY_TAG, category_partitions


@dg.schedule(
    job=cfr_job,
    cron_schedule="0 3 * * 0",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Every Sunday 03:00 UTC: re-fit every category from its current shot library.",
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


hourly_line_summary = dg.ScheduleDefinition(
    name="hourly_line_summary",
    job=line_job,
    cron_schedule="0 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every hour: summarise the line's verdicts per deployed category (cheap: SQL).",
)
