"""Memory banks, greedy coreset and chunked nearest-neighbour search."""

from cfr_core.memory.bank import (
    Banks,
    EmptyBankError,
    build_banks,
    build_joint_bank,
    joint_features,
)
from cfr_core.memory.coreset import greedy_coreset
from cfr_core.memory.search import max_cosine, max_cosine_pair, nearest_distance, topk_cosine

__all__ = [
    "Banks",
    "EmptyBankError",
    "build_banks",
    "build_joint_bank",
    "greedy_coreset",
    "joint_features",
    "max_cosine",
    "max_cosine_pair",
    "nearest_distance",
    "topk_cosine",
]
