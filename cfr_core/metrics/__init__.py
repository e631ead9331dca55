"""Anomaly-detection metrics: I-AUROC, P-AUROC, AUPRO (exact and thresholded)."""

from cfr_core.metrics.aupro import AUPRO_LIMITS, aupro, aupro_multi, label_regions, pro_curve
from cfr_core.metrics.report import MetricReport, compute_report
from cfr_core.metrics.roc import image_auroc, pixel_auroc, roc_auc

__all__ = [
    "AUPRO_LIMITS",
    "MetricReport",
    "aupro",
    "aupro_multi",
    "compute_report",
    "image_auroc",
    "label_regions",
    "pixel_auroc",
    "pro_curve",
    "roc_auc",
]
