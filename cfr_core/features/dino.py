"""RGB features from a frozen timm Vision Transformer (default: DINO ViT-B/8).

Input: the square scan, bicubic-resized to the model's input size (224), ImageNet
mean/std. Output: the last block's tokens after the final norm, prefix (CLS)
tokens dropped, reshaped to the patch grid (28×28 for ViT-B/8) and bilinearly
upsampled to the feature grid.

Weights never download inside a forward pass: they come from an explicit
checkpoint path (the official ``dino_vitbase8_pretrain.pth`` or any timm-format
state dict, ``.pth`` or ``.safetensors``) or from a copy already in the local
Hugging Face cache; otherwise construction fails with a message naming where
to get the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from cfr_core.data.prepare import PreparedScan
from cfr_core.errors import ConfigError, DataError
from cfr_core.features.base import Extractor, file_sha256, register_extractor
from cfr_core.features.offline import rgb_to_grid

DEFAULT_MODEL = "vit_base_patch8_224.dino"


def _cached_hub_file(pretrained_cfg: dict) -> Path | None:
    """The model's weights in the local Hugging Face cache, if present (never downloads)."""
    repo = pretrained_cfg.get("hf_hub_id")
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    return None


class ViTExtractor(Extractor):
    name = "dino_vit"
    modality = "rgb"

    def __init__(
        self,
        grid: int = 224,
        model: str = DEFAULT_MODEL,
        checkpoint: str | None = None,
        allow_random_weights: bool = False,
        seed: int = 0,
    ):
        import timm

        try:
            probe = timm.create_model(model, pretrained=False)
        except Exception as exc:
            raise ConfigError(f"timm has no model {model!r} ({exc})") from exc
        if not hasattr(probe, "patch_embed") or not hasattr(probe, "forward_features"):
            raise ConfigError(f"{model!r} is not a ViT with patch tokens")
        hint = (
            f"pass rgb_options checkpoint=PATH to the weights of {model} "
            f"(DINO ViT-B/8: dino_vitbase8_pretrain.pth from github.com/facebookresearch/dino), "
            f"or place them in the Hugging Face cache ({probe.pretrained_cfg.get('hf_hub_id')})"
        )
        weights = Path(checkpoint) if checkpoint else _cached_hub_file(probe.pretrained_cfg)
        if weights is None:
            if not allow_random_weights:
                raise ConfigError(f"no weights for {model}: {hint}")
            torch.manual_seed(seed)
            net, sha = probe, f"random-seed{seed}"
        else:
            if not weights.is_file():
                raise DataError("ViT checkpoint not found", weights, hint)
            try:
                net = timm.create_model(
                    model, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}
                )
            except Exception as exc:
                raise DataError(
                    f"checkpoint does not fit {model} ({type(exc).__name__}: {exc})", weights
                ) from exc
            sha = file_sha256(weights)
        patch = net.patch_embed.patch_size
        size = net.patch_embed.img_size
        settings = {"model": model, "input": list(size), "patch": list(patch)}
        super().__init__(net.embed_dim, grid, settings, sha)
        self.net = net
        self.input_size = tuple(size)
        self.tokens = (size[0] // patch[0], size[1] // patch[1])
        cfg = net.pretrained_cfg
        self.register_buffer(
            "mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
        )
        self.register_buffer(
            "std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
        )

    @torch.no_grad()
    def forward(self, scans: Sequence[PreparedScan]) -> torch.Tensor:
        x = rgb_to_grid(scans, self.input_size, self.device, mode="bicubic")
        tokens = self.net.forward_features((x - self.mean) / self.std)
        tokens = tokens[:, self.net.num_prefix_tokens :]
        b, _, c = tokens.shape
        fmap = tokens.transpose(1, 2).reshape(b, c, *self.tokens)
        return F.interpolate(
            fmap, size=(self.grid, self.grid), mode="bilinear", align_corners=False
        )


@register_extractor("dino_vit")
def _dino_vit(grid: int = 224, **options) -> ViTExtractor:
    return ViTExtractor(grid, **options)
