"""CFR Factory core library: few-shot RGB + 3D anomaly detection in plain torch.

This package never imports dagster; the orchestration lives in ``cfr_assets``.
"""

__version__ = "0.1.0"
