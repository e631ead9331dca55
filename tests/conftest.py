"""Shared fixtures: small synthetic datasets generated once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cfr_core.data.synth import SynthConfig, generate

SMALL = SynthConfig(
    categories=("dome", "candy", "speckled", "ribbed"),
    seed=7,
    size=96,
    n_train=4,
    n_validation=1,
    n_test_good=2,
    n_test_per_defect=1,
)


@pytest.fixture(scope="session")
def small_config() -> SynthConfig:
    return SMALL


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small, valid synthetic dataset (read-only by convention: copy before breaking it)."""
    return generate(tmp_path_factory.mktemp("synth") / "data", SMALL)


@pytest.fixture
def synth_copy(synth_root, tmp_path) -> Path:
    """A private copy of the small dataset that a test may damage."""
    dst = tmp_path / "data"
    shutil.copytree(synth_root, dst)
    return dst
