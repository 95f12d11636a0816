"""Samples from a trained run or a model + spec, and labelled sample grids."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dimr_lab.errors import UserError


def class_balanced_labels(n: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., K-1, 0, 1, ... (n,): every class n/K times (+1 for the first n mod K)."""
    return torch.arange(n, dtype=torch.long) % max(1, num_classes)  # (n,)


def load_run_model(run_dir: Path, *, ema: bool = True, device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(model in eval mode, RunSpec) of a run directory from spec.json and checkpoints/last.pt."""
    from dimr_lab.nn.network import build_model
    from dimr_lab.train.checkpoint import load_checkpoint
    from dimr_lab.train.runinfo import read_run_spec

    run_dir = Path(run_dir)
    spec = read_run_spec(run_dir)
    path = run_dir / "checkpoints" / "last.pt"
    if not path.exists():
        raise UserError(f"{path}: no checkpoint (has this run trained and saved a step yet?)")
    ckpt = load_checkpoint(path, model_spec=spec.model)
    model = build_model(spec.model)
    try:
        model.load_state_dict(ckpt["ema" if ema else "model"])
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit the run's model spec ({str(err).splitlines()[0][:200]})") from None
    return model.to(device).eval(), spec


@torch.no_grad()
def generate(model: Any, spec: Any, labels: torch.Tensor, *, seed: int = 0, batch_size: int = 256,
             sampler: str | None = None, steps: int | None = None, order: int | None = None,
             guidance_scale: float | None = None) -> torch.Tensor:
    """Samples (N, C, H, W) float on the CPU for `labels` (N,) with spec.sample (arguments override it).

    Starting noise comes from a CPU generator seeded with `seed`, batch after batch, so the result does not
    depend on the device; guidance uses model.null_label.
    """
    from dimr_lab.diffusion.samplers import sample
    from dimr_lab.diffusion.schedule import build_schedule

    s = spec.sample
    mspec = model.spec
    device = next(model.parameters()).device
    schedule = build_schedule(spec.diffusion.schedule, spec.diffusion.num_steps)
    shape = (mspec.in_channels, mspec.image_size, mspec.image_size)
    gen = torch.Generator().manual_seed(seed)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.train.precision) if device.type == "cuda" else None
    out = []
    for i in range(0, len(labels), batch_size):
        y = labels[i: i + batch_size].to(device)  # (b,)
        x_T = torch.randn((len(y), *shape), generator=gen).to(device)  # (b, C, H, W) ~ N(0, I)

        def model_fn(x: torch.Tensor, t: torch.Tensor, yy: torch.Tensor | None) -> torch.Tensor:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                return model(x, t, yy)[-1].float()  # (b, C, H, W) full-resolution eps

        x = sample(model_fn, x_T, y, sampler=sampler or s.sampler, steps=steps or s.steps, order=order or s.order,
                   schedule=schedule, t_end=s.t_end,
                   guidance_scale=s.guidance_scale if guidance_scale is None else guidance_scale,
                   guidance_form=s.guidance_form, guidance_schedule=s.guidance_schedule,
                   guidance_power=s.guidance_power, null_label=int(getattr(model, "null_label", mspec.num_classes)))
        out.append(x.float().cpu())
    return torch.cat(out) if out else torch.empty((0, *shape))  # (N, C, H, W)


def to_uint8(x: torch.Tensor, data_spec: Any = None) -> torch.Tensor:
    """Model-space samples (N, C, H, W) -> uint8 images (N, 3, H, W); pixels in [-1, 1] map to 0..255."""
    if data_spec is not None and getattr(data_spec, "name", "") == "latents":
        from dimr_lab.data.latents import decode_latents  # through data.vae (a SpecError without one)

        x = decode_latents(x, data_spec)
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (N, C, H, W)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grey -> RGB for extractors and grids
    return x.contiguous()


def save_grid(images: Any, labels: Sequence[int] | torch.Tensor | None, path: Path,
              class_names: Sequence[str] | None = None, *, ncols: int | None = None) -> Path:
    """A PNG grid of uint8 images ((N, C, H, W) or (N, H, W, C)), each titled with its class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = torch.as_tensor(np.asarray(images))
    if imgs.dim() != 4:
        raise UserError(f"save_grid needs (N, C, H, W) or (N, H, W, C) images, got shape {tuple(imgs.shape)}")
    if imgs.shape[1] in (1, 3) and imgs.shape[-1] not in (1, 3):
        imgs = imgs.permute(0, 2, 3, 1)  # (N, H, W, C)
    if imgs.dtype != torch.uint8:
        imgs = imgs.clamp(0, 255).round().to(torch.uint8)
    if imgs.shape[-1] == 1:
        imgs = imgs.expand(-1, -1, -1, 3)
    n, h, w, _ = imgs.shape
    cols = ncols or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    pad = max(1, h // 16)
    scale = max(1.0, 64.0 / h)  # small images drawn larger so the labels stay legible
    font_pt = 7.0
    lab_h = math.ceil(font_pt * 1.6 / 72 * 100 / scale)  # a white strip above each image for its label
    cell_h, cell_w = lab_h + h + pad, w + pad
    mosaic = np.full((rows * cell_h + pad, cols * cell_w + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = r * cell_h + lab_h, pad + c * cell_w
        mosaic[top: top + h, left: left + w] = imgs[i].numpy()
    fig = plt.figure(figsize=(mosaic.shape[1] * scale / 100, mosaic.shape[0] * scale / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    labels_list = [int(v) for v in (labels.tolist() if torch.is_tensor(labels) else labels)] if labels is not None else []
    for i, lab in enumerate(labels_list[:n]):
        r, c = divmod(i, cols)
        name = class_names[lab] if class_names is not None and 0 <= lab < len(class_names) else str(lab)
        ax.text(pad + c * cell_w + w / 2, r * cell_h + lab_h - 1, name, ha="center", va="bottom", fontsize=font_pt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
