"""The one image writer: PNGs written atomically (a reader, or a run killed mid-write, never sees half a
file), sample grids with their class labels, and matplotlib figures. numpy and matplotlib only (no torch)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dimr_lab.atomic import atomic_write
from dimr_lab.errors import UserError


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figure(fig: Any, path: str | Path, *, dpi: int = 100) -> Path:
    """Save a matplotlib figure as a PNG atomically and close it; an unwritable path is one UserError."""
    plt = _pyplot()
    path = Path(path)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    _write_bytes(path, buf.getvalue())
    return path


def _write_bytes(path: Path, data: bytes) -> None:
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name for the PNG")
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None


def as_hwc_uint8(images: Any) -> np.ndarray:
    """(N, C, H, W) or (N, H, W, C) images (uint8, or floats in 0..255) as uint8 (N, H, W, 3)."""
    imgs = np.asarray(images)
    if imgs.ndim != 4:
        raise UserError(f"a sample grid needs (N, C, H, W) or (N, H, W, C) images, got shape {imgs.shape}")
    if imgs.shape[1] in (1, 3) and imgs.shape[-1] not in (1, 3):
        imgs = imgs.transpose(0, 2, 3, 1)  # (N, H, W, C)
    if imgs.dtype != np.uint8:
        imgs = np.clip(np.round(imgs.astype(np.float64)), 0, 255).astype(np.uint8)
    if imgs.shape[-1] == 1:
        imgs = np.repeat(imgs, 3, axis=-1)
    return imgs


def write_grid(images: Any, path: str | Path, labels: Sequence[int] | None = None,
               class_names: Sequence[str] | None = None, *, ncols: int | None = None) -> Path:
    """A PNG grid of images, each titled with its class name (or number)."""
    plt = _pyplot()
    imgs = as_hwc_uint8(images)
    n, h, w, _ = imgs.shape
    cols = ncols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    pad = max(1, h // 16)
    scale = max(1.0, 64.0 / h)  # small images drawn larger so the labels stay legible
    font_pt = 7.0
    lab_h = math.ceil(font_pt * 1.6 / 72 * 100 / scale) if labels is not None else 0  # a strip for the label
    cell_h, cell_w = lab_h + h + pad, w + pad
    mosaic = np.full((rows * cell_h + pad, cols * cell_w + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = r * cell_h + lab_h + (pad if not lab_h else 0), pad + c * cell_w
        mosaic[top: top + h, left: left + w] = imgs[i]
    fig = plt.figure(figsize=(mosaic.shape[1] * scale / 100, mosaic.shape[0] * scale / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for i, lab in enumerate(list(labels)[:n] if labels is not None else []):
        r, c = divmod(i, cols)
        lab = int(lab)
        name = class_names[lab] if class_names is not None and 0 <= lab < len(class_names) else str(lab)
        ax.text(pad + c * cell_w + w / 2, r * cell_h + lab_h - 1, name, ha="center", va="bottom", fontsize=font_pt)
    return write_figure(fig, path)
