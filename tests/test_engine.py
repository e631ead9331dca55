from dataclasses import replace

import numpy as np
import pytest
import torch

from cfr_core.config import METHODS, ExtractorConfig, FitConfig
from cfr_core.engine import (
    FeatureCache,
    build_extractors,
    evaluate,
    extract_features,
    fit,
    fit_features,
    infer,
)
from cfr_core.engine.train import TrainingError
from cfr_core.errors import ConfigError, ShapeMismatchError
from cfr_core.io import ArtifactError, load_model, save_model, verify_model

GRID = 32


def tiny(method: str, **kw) -> FitConfig:
    cfg = FitConfig.for_method(method, shots=2, extractors=ExtractorConfig(grid=GRID), **kw)
    return replace(
        cfg, mappers=replace(cfg.mappers, epochs=4), retriever=replace(cfg.retriever, epochs=4)
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return FeatureCache(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def fitted(synth_root, cache):
    return {m: fit(synth_root, "speckled", tiny(m), cache) for m in ("cfr", "cfm", "btf")}


def test_config_defaults_reproduce_the_paper():
    cfg = FitConfig.for_method("cfr", extractors=ExtractorConfig.preset("paper"))
    assert (
        cfg.mappers.kind,
        cfg.mappers.cyclic,
        cfg.mappers.lr,
        cfg.mappers.epochs,
        cfg.mappers.seed,
    ) == ("geglu", True, 1e-3, 100, 115)
    assert (
        cfg.retriever.top_k,
        cfg.retriever.d_model,
        cfg.retriever.lr,
        cfg.retriever.max_queries,
    ) == (3, 128, 1e-4, 20_000)
    assert (
        cfg.banks.coreset_ratio == 0.1
        and cfg.banks.projection_dim == 128
        and cfg.banks.n_starts == 10
    )
    assert cfg.scoring.theta == 0.4 and cfg.scoring.blur == ((5, 1),) and cfg.extractors.grid == 224
    assert not cfg.extractors.standardized
    cfm = FitConfig.for_method("cfm", extractors=ExtractorConfig.preset("paper"))
    assert (cfm.mappers.kind, cfm.mappers.cyclic, cfm.scoring.blur) == (
        "mlp",
        False,
        ((5, 5), (7, 3)),
    )
    offline = FitConfig.for_method("cfr")
    assert offline.extractors.standardized and offline.scoring.blur == ((5, 5), (7, 3))
    assert FitConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown method"):
        FitConfig(method="patchcore")


def test_every_method_fits_and_evaluates(synth_root, cache, fitted):
    for method in METHODS:
        model = fitted.get(method) or fit(synth_root, "speckled", tiny(method), cache)
        ev = evaluate(model, synth_root, cache)
        r = ev.report
        assert 0 <= r.image_auroc <= 1 and 0 < r.aupro[0.3] <= 1 and r.n_test == 5, method
        assert ev.result.maps.shape == (5, GRID, GRID)
        assert 0 <= ev.replacement_rate <= 1
        assert model.threshold > 0 and model.threshold_source == "validation/good"
        if model.config.replacement is None:  # only the replacing family may replace
            assert ev.replacement_rate == 0, method


def test_replacement_fires_at_low_theta(synth_root, cache, fitted):
    model = fitted["cfr"]
    ev = evaluate(model.variant(theta=0.0), synth_root, cache)
    assert ev.replacement_rate == pytest.approx(1.0)  # d >= 0 everywhere: every pixel replaced
    base = evaluate(model, synth_root, cache)
    assert not torch.equal(ev.result.maps, base.result.maps)


def test_replacement_decision_is_the_plausibility_rule(synth_root, cache, fitted):
    from cfr_core.data.mvtec import index_category
    from cfr_core.engine.infer import plausibility, replace_unreliable

    model = fitted["cfr"]
    feats = extract_features(
        index_category(synth_root, "speckled").split("test")[:2],
        build_extractors(model.config.extractors),
        model.config.preprocess,
        cache,
    )
    feats = model.norm.apply(feats)
    fg = feats.foreground[0]
    f_rgb, f_3d = feats.rgb[0][:, fg].T, feats.points[0][:, fg].T
    p_rgb, _ = model.mappers(f_rgb, f_3d)
    d = plausibility(p_rgb, model.banks.rgb)
    counts = []
    for theta in (0.02, 0.05, 0.1, 0.4):
        out, n = replace_unreliable(model.variant(theta=theta), p_rgb, f_rgb, f_3d)
        assert n == int((d >= theta).sum()), theta
        assert torch.equal(out[d < theta], p_rgb[d < theta])
        counts.append(n)
    assert counts[0] > counts[-1]  # the thresholds really split the pixels differently


def test_fit_is_deterministic(synth_root, cache, fitted):
    again = fit(synth_root, "speckled", tiny("cfr"), cache)
    first = fitted["cfr"].tensors()
    assert first.keys() == again.tensors().keys()
    assert all(torch.equal(first[k], v) for k, v in again.tensors().items())
    assert [s.key for s in again.shots] == [s.key for s in fitted["cfr"].shots]


def test_cache_gives_identical_features(synth_root, cache, tmp_path):
    cfg = tiny("cfr")
    ex = build_extractors(cfg.extractors)
    from cfr_core.data.mvtec import index_category

    samples = index_category(synth_root, "ribbed").split("test")[:3]
    cold = extract_features(samples, ex, cfg.preprocess, None)
    warm_cache = FeatureCache(tmp_path / "c")
    first = extract_features(samples, ex, cfg.preprocess, warm_cache)
    second = extract_features(samples, ex, cfg.preprocess, warm_cache)
    # per sample: both extractors' features and the shape map (the gate's shape check)
    assert len(list((tmp_path / "c").rglob("*.safetensors"))) == 9
    for a, b in ((cold, first), (first, second)):
        assert (
            torch.equal(a.rgb, b.rgb)
            and torch.equal(a.points, b.points)
            and torch.equal(a.masks, b.masks)
            and torch.equal(a.shape.nan_to_num(nan=-1.0), b.shape.nan_to_num(nan=-1.0))
        )
    assert (
        cold.masks[1].any() and not cold.masks[2].any()
    )  # dent 000 has ground truth, good 000 none


def test_inference_is_batch_invariant(synth_root, cache, fitted):
    model = fitted["cfr"]
    ex = build_extractors(model.config.extractors)
    from cfr_core.data.mvtec import index_category

    feats = extract_features(
        index_category(synth_root, "speckled").split("test"), ex, model.config.preprocess, cache
    )
    together = infer(model, feats)
    alone = [infer(model, feats.select([i])) for i in range(len(feats))]
    assert torch.allclose(together.scores, torch.cat([a.scores for a in alone]), atol=1e-6)
    assert torch.allclose(together.maps, torch.cat([a.maps for a in alone]), atol=1e-6)


def test_upsample_samples_is_exact_at_samples_and_linear_between():
    from cfr_core.engine.infer import upsample_samples

    ramp = torch.arange(4.0).view(1, 4).expand(4, 4)  # value j at full-grid column 3·j
    up = upsample_samples(ramp, 3, 11)  # samples at 0, 3, 6, 9; column 10 repeats 9
    assert torch.allclose(up[0, :10], torch.arange(10.0) / 3, atol=1e-6)
    assert up[0, 10] == up[0, 9] and torch.equal(up[:, 0], torch.zeros(11))
    assert torch.equal(upsample_samples(torch.tensor([[2.5]]), 4, 3), torch.full((3, 3), 2.5))


def test_strided_inference_covers_the_foreground_and_follows_the_full_map(
    synth_root, cache, fitted
):
    from cfr_core.data.mvtec import index_category

    feats = extract_features(
        index_category(synth_root, "speckled").split("test"),
        build_extractors(fitted["cfr"].config.extractors),
        fitted["cfr"].config.preprocess,
        cache,
    )
    for method in ("cfr", "btf"):
        model = fitted[method]
        full = infer(model, feats)
        strided = infer(
            replace(
                model, config=replace(model.config, scoring=replace(model.config.scoring, stride=2))
            ),
            feats,
        )
        unblurred = replace(model.config.scoring, blur=(), stride=2)
        raw = infer(replace(model, config=replace(model.config, scoring=unblurred)), feats)
        fg = feats.foreground
        assert (raw.maps[fg] > 0).all() and (raw.maps[~fg] == 0).all()  # no hole, no bleed
        corr = np.corrcoef(full.maps.flatten().numpy(), strided.maps.flatten().numpy())[0, 1]
        assert corr > 0.9, (method, corr)
        assert not torch.equal(full.maps, strided.maps)
    with pytest.raises(ConfigError, match="stride"):
        replace(fitted["cfr"].config.scoring, stride=0)


def test_save_load_round_trip_gives_identical_scores(synth_root, cache, fitted, tmp_path):
    for method, model in fitted.items():
        digest = save_model(model, tmp_path / method)
        assert verify_model(tmp_path / method) == digest
        loaded = load_model(tmp_path / method)
        assert loaded.config == model.config and loaded.threshold == model.threshold
        a, b = evaluate(model, synth_root, cache), evaluate(loaded, synth_root, cache)
        assert np.array_equal(a.scores, b.scores), method
    assert not list(tmp_path.glob(".*"))  # no temp folders left behind


def test_altered_or_incomplete_model_is_refused(fitted, tmp_path):
    save_model(fitted["cfr"], tmp_path / "m")
    weights = tmp_path / "m" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.safetensors: file content does not match"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_model(tmp_path / "m")
    with pytest.raises(ArtifactError, match="model folder not found"):
        load_model(tmp_path / "nothing")


def test_training_errors(synth_root, cache):
    cfg = tiny("cfr")
    ex = build_extractors(cfg.extractors)
    from cfr_core.data.mvtec import index_category

    feats = extract_features(
        index_category(synth_root, "dome").split("train")[:2], ex, cfg.preprocess, cache
    )
    bad = replace(feats, rgb=feats.rgb.clone())
    bad.rgb[0, 0, 10:20, 10:20] = float("nan")
    with pytest.raises(TrainingError, match="mappers: loss became nan at epoch 1"):
        fit_features(
            "dome", replace(cfg, extractors=replace(cfg.extractors, standardize=False)), bad, ex
        )
    empty = replace(feats, points=torch.zeros_like(feats.points))
    with pytest.raises(TrainingError, match="no foreground"):
        fit_features(
            "dome", replace(cfg, extractors=replace(cfg.extractors, standardize=False)), empty, ex
        )


def test_wrong_feature_dims_are_refused(synth_root, cache, fitted):
    model = fitted["cfm"]
    ex = build_extractors(model.config.extractors)
    from cfr_core.data.mvtec import index_category

    feats = extract_features(
        index_category(synth_root, "dome").split("train")[:1], ex, model.config.preprocess, cache
    )
    with pytest.raises(ShapeMismatchError, match="fitted on"):
        infer(model, replace(feats, rgb=feats.rgb[:, :10]))
