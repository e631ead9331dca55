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
    """Tile equally sized uint8 pictures into one, as wide as the tiles need (no blank tiles
    for fewer than ``columns`` pictures)."""
    if not tiles:
        return np.zeros((8, 8, 3), np.uint8)
    columns = max(1, min(columns, len(tiles)))
    h, w = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    sheet = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = t
    return sheet


def loss_table(history: dict[str, list[float]], points: int = 10) -> dg.MetadataValue:
    """Loss curves as a table the UI shows without a click (every n-th epoch and the last)."""
    records = []
    longest = max((len(v) for v in history.values()), default=0)
    step = max(1, longest // points)
    for epoch in sorted({*range(step, longest + 1, step), longest} - {0}):
        row = {"epoch": epoch}
        for stage, losses in history.items():
            if epoch <= len(losses):
                row[f"{stage} loss"] = round(float(losses[epoch - 1]), 5)
        records.append(dg.TableRecord(row))
    columns = [dg.TableColumn("epoch", "int")] + [
        dg.TableColumn(f"{stage} loss", "float") for stage in history
    ]
    return dg.MetadataValue.table(records, dg.TableSchema(columns=columns))


def save_png(picture: np.ndarray | Image.Image, path) -> str:
    """Write a picture next to the artifacts (the UI links the path) and return the path."""
    img = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
    img.save(path, format="PNG")
    return str(path)
