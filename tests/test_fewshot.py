import numpy as np
import pytest

from cfr_core.data.fewshot import select_shots
from cfr_core.data.mvtec import index_category
from cfr_core.errors import ConfigError, EmptyCategoryError


@pytest.mark.parametrize("k", [1, 2, 4])
def test_protocol_matches_published_recipe(synth_root, k):
    train = index_category(synth_root, "candy").split("train")
    shuffled = list(reversed(train))  # order of the input must not matter
    sel = select_shots(shuffled, k)
    expected = sorted(np.random.default_rng(42).choice(len(train), k, replace=False).tolist())
    assert list(sel.indices) == expected
    pool = sorted(train, key=lambda s: s.stem)
    assert [s.stem for s in sel.samples] == [pool[i].stem for i in expected]
    assert all(s.rgb_path.exists() and s.xyz_path.exists() for s in sel.samples)
    assert sel.seed == 42 and sel.n_available == len(train)


def test_other_seeds_and_k(synth_root):
    train = index_category(synth_root, "candy").split("train")
    a, b = select_shots(train, 3, seed=1), select_shots(train, 3, seed=1)
    assert a.indices == b.indices and len(a.indices) == 3
    assert select_shots(train, len(train)).indices == tuple(range(len(train)))


def test_bad_requests(synth_root):
    idx = index_category(synth_root, "candy")
    with pytest.raises(ConfigError, match="only 4 normal"):
        select_shots(idx.split("train"), 5)
    with pytest.raises(ConfigError, match="positive"):
        select_shots(idx.split("train"), 0)
    with pytest.raises(EmptyCategoryError):
        select_shots([], 1)
    with pytest.raises(ConfigError, match="normal"):
        select_shots(idx.split("test"), 1)
