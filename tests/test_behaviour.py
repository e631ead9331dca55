"""Every method's results on fixed inputs are exactly those recorded in
tests/fixtures/behaviour.json (weights, thresholds, θ, metrics, every test score): a
restructuring that changes none of them changed no behaviour. A change meant to alter
results rewrites the fixture with `tests/fixtures/behaviour.py` and says so."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import behaviour


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    return behaviour.record(tmp_path_factory.mktemp("behaviour"))


@pytest.fixture(scope="module")
def expected():
    return json.loads(behaviour.FIXTURE.read_text())


def test_every_method_is_recorded(recorded, expected):
    from cfr_core.config import METHODS

    assert set(recorded) == set(expected)
    assert {key.split("/")[1] for key in expected} == set(METHODS)


@pytest.mark.parametrize("run", sorted(json.loads(behaviour.FIXTURE.read_text())))
def test_results_are_bit_identical_to_the_record(recorded, expected, run):
    got, want = recorded[run], expected[run]
    assert got["tensors"] == want["tensors"], f"{run}: weights differ"
    for field in ("threshold", "gate_threshold", "theta", "image_auroc", "aupro_30"):
        assert got[field] == want[field], f"{run}: {field} {got[field]!r} != {want[field]!r}"
    assert got["scores"] == want["scores"], f"{run}: test scores differ"
