"""One dynamic partition per product category (added by the landing sensor or `cfr demo`)."""

import dagster as dg

CATEGORY_TAG = "cfr/category"
category_partitions = dg.DynamicPartitionsDefinition(name="category")

OWNERS = ["team:vision-engineering"]


def stage_asset(description: str, deps=(), kind: str = "pytorch"):
    """The decorator every pipeline stage shares: partitioned by category, group "cfr"."""
    return dg.asset(
        partitions_def=category_partitions,
        group_name="cfr",
        owners=OWNERS,
        kinds={kind},
        deps=list(deps),
        description=description,
    )
