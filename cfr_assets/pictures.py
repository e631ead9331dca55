"""Pictures for the Dagster UI: PNGs embedded as base64 markdown (Dagster has no image metadata type)."""

from __future__ import annotations

import base64
import io

import dagster as dg
import numpy as np
from PIL import Image


def png_markdown(picture: np.ndarray | Image.Image, alt: str = "") -> dg.MetadataValue:
    img = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{data})")


def loss_plot(history: dict[str, list[float]]) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=90)
    for stage, losses in history.items():
        ax.plot(range(1, len(losses) + 1), losses, label=stage)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def gallery(tiles: list[np.ndarray], columns: int = 4) -> np.ndarray:
    """Tile equally sized uint8 pictures into one."""
    if not tiles:
        return np.zeros((8, 8, 3), np.uint8)
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    sheet = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = t
    return sheet
