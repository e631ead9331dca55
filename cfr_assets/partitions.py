"""One dynamic partition per product category (added by the landing sensor or `cfr demo`)."""

import dagster as dg

CATEGORY_TAG = "cfr/category"
category_partitions = dg.DynamicPartitionsDefinition(name="category")
