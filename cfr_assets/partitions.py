"""One dynamic partition per product category, and the decorator every stage shares."""

import dagster as dg

#: rebuild runs of a category carry this tag (the run queue allows one per category)
CATEGORY_TAG = "cfr/category"
#: ingest runs carry this one instead: they never queue behind a rebuild (one per category)
INGEST_TAG = "cfr/ingest"
PARTITION_TAG = "dagster/partition"
category_partitions = dg.DynamicPartitionsDefinition(name="category")

OWNERS = ["team:vision-engineering"]
#: asset groups, in the order the UI shows them
INGEST, TRAINING, RELEASE = "ingest", "training", "release"


def stage_asset(
    description: str,
    deps=(),
    kinds: tuple[str, ...] = ("pytorch", "safetensors"),
    group: str = TRAINING,
):
    """The decorator every pipeline stage shares: partitioned by category, owned, grouped, kinded.

    The ``store`` resource every stage uses holds the category's lock for the whole run.
    """
    return dg.asset(
        partitions_def=category_partitions,
        group_name=group,
        owners=OWNERS,
        kinds=set(kinds),
        deps=list(deps),
        description=description,
    )
