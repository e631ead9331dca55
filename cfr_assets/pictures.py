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
    return _figure_image(fig)


def _figure_image(fig) -> Image.Image:
    """A matplotlib figure as an RGB picture (the figure is closed)."""
    import matplotlib.pyplot as plt

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


def captioned(tile: np.ndarray, text: str, failed: bool | None = None) -> np.ndarray:
    """``tile`` with ``text`` on a dark band along its top; the band is red for FAIL, green
    for PASS, grey when there is no verdict."""
    from PIL import ImageDraw

    img = Image.fromarray(tile)
    colour = (128, 128, 128) if failed is None else ((200, 30, 30) if failed else (30, 150, 60))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, img.width, 13], fill=(0, 0, 0))
    draw.rectangle([0, 0, 4, 13], fill=colour)
    draw.text((7, 1), text, fill=(255, 255, 255))
    return np.asarray(img)


def score_histogram(
    scores: np.ndarray,
    defects: list[str],
    threshold: float | None,
    gate_threshold: float | None = None,
) -> Image.Image:
    """Test scores by kind (good, then each defect type), with the line's and the gate's
    thresholds drawn: what the threshold decides, at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = np.asarray(scores, dtype=float)
    kinds = sorted(set(defects), key=lambda k: (k != "good", k))
    fig, ax = plt.subplots(figsize=(6, 2.8), dpi=90)
    bins = np.linspace(scores.min(), scores.max(), 30) if scores.size else 10
    for kind in kinds:
        vals = scores[np.array([d == kind for d in defects])]
        ax.hist(
            vals,
            bins=bins,
            alpha=0.55 if kind == "good" else 0.45,
            label=f"{kind} ({len(vals)})",
            color="tab:green" if kind == "good" else None,
        )
    for value, label, style in (
        (threshold, "line threshold", "-"),
        (gate_threshold, "gate threshold", "--"),
    ):
        if value is not None:
            ax.axvline(value, color="black", linestyle=style, label=f"{label} {value:.3f}")
    ax.set_xlabel("image score (above the line threshold: FAIL)")
    ax.set_ylabel("test scans")
    ax.legend(fontsize=7)
    return _figure_image(fig)


def verdict_table(rows: list[tuple[float, float | None, float | None, str]]) -> dg.MetadataValue:
    """False rejects and escapes at candidate thresholds (threshold, rate, rate, note)."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    lines = ["| threshold | good parts rejected | defective parts passed | |", "|---|---|---|---|"]
    lines += [f"| {t:.4f} | {pct(f)} | {pct(e)} | {note} |" for t, f, e, note in rows]
    return dg.MetadataValue.md("\n".join(lines))
