"""CFR Factory's Dagster pipeline. Only this package imports dagster; it calls cfr_core."""
