"""Datasets, by name from the registry (`dimr-lab components dataset`; built-ins in dimr_lab.catalog).

Every dataset yields (x, label): x is an image float tensor (C, H, W) in [-1, 1] (kind 'pixels') or a
scaled latent (C, h, w) (kind 'latents'); each has `num_classes`, `channels`, `image_size`, `kind`.
A dataset module provides `build(data_spec, split, seed)`; its registry entry lists the spec keys it
reads, which is what identifies its images (`dataset_identity`, the key of caches built on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dimr_lab.errors import SpecError, unknown_name_message
from dimr_lab.registry import DATASETS

if TYPE_CHECKING:
    from dimr_lab.spec.run_spec import DataSpec

SPLITS = ("train", "test")


def build_dataset(data_spec: "DataSpec", *, split: str = "train", seed: int = 0) -> Any:
    """The torch Dataset a data spec names; flips apply to the 'train' split only."""
    if split not in SPLITS:
        raise SpecError(unknown_name_message("split", split, SPLITS))
    return DATASETS.get(data_spec.name, key="data.name")(data_spec, split, seed)


def prepare_latents(src_folder, out_dir, *, vae, image_size: int = 256, batch_size: int = 32, flip: bool = True):
    """Encode an ImageFolder tree into the released latents layout (see `dimr_lab.data.latents`)."""
    from dimr_lab.data.latents import prepare_latents as _prepare

    return _prepare(src_folder, out_dir, vae=vae, image_size=image_size, batch_size=batch_size, flip=flip)


def dataset_identity(data_spec: "DataSpec", seed: int = 0) -> dict:
    """What makes a dataset's images what they are: its name, seed and the keys its registry entry reads
    (folders resolved to absolute paths). Keys caches of models trained on it (the evaluation classifier)."""
    ident: dict[str, Any] = {"name": data_spec.name, "seed": seed}
    for key in DATASETS.entry(data_spec.name).keys:
        field = key.split(".", 1)[1]
        value = getattr(data_spec, field)
        if field in ("root", "vae") and value:
            value = str(Path(value).expanduser().resolve())
        ident[field] = list(value) if isinstance(value, (list, tuple)) else value
    return ident


__all__ = ["build_dataset", "dataset_identity", "prepare_latents"]
