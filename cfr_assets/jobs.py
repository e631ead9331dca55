"""The jobs: ingest new landing scans, rebuild a category from its shot library, and
summarise what the line did with the deployed models.

Both run every step in one process (``in_process_executor``): the stages form a
chain, so separate step processes would only re-import torch and Dagster seven
times, and one process lets the category lock be held from the first step to
the last.
"""

import dagster as dg

from cfr_assets.partitions import INGEST, RELEASE, TRAINING
from cfr_assets.resources import INGEST_JOB

ingest_job = dg.define_asset_job(
    INGEST_JOB,
    selection=dg.AssetSelection.groups(INGEST),
    executor_def=dg.in_process_executor,
    description="Ingest a category's new landing scans into its shot library (quality-gated).",
)

cfr_job = dg.define_asset_job(
    "cfr_category_job",
    selection=dg.AssetSelection.groups(INGEST, TRAINING, RELEASE),
    executor_def=dg.in_process_executor,
    description=(
        "Rebuild one category: library → shots → features → standardisation → mappers → "
        "banks → retriever → evaluation → deployment."
    ),
)

line_job = dg.define_asset_job(
    "cfr_line_job",
    selection=dg.AssetSelection.groups("line"),
    description="Summarise the verdicts `cfr serve` recorded, per deployed category.",
)
