"""Datasets: procedural shapes, sklearn digits, ImageFolder trees and pre-extracted VAE latents.

Every dataset yields (x, label): x is an image float tensor (C, H, W) in [-1, 1] (kind 'pixels') or a
scaled latent (C, h, w) (kind 'latents'); each has `num_classes`, `channels`, `image_size`, `kind`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dimr_lab.errors import SpecError, unknown_name_message

if TYPE_CHECKING:
    from dimr_lab.spec.run_spec import DataSpec

DATASET_NAMES = ("shapes", "digits", "folder", "latents")
SPLITS = ("train", "test")


def build_dataset(data_spec: "DataSpec", *, split: str = "train", seed: int = 0):
    """The torch Dataset a data spec names; flips apply to the 'train' split only."""
    if split not in SPLITS:
        raise SpecError(unknown_name_message("split", split, SPLITS))
    name, size, k = data_spec.name, data_spec.image_size, data_spec.num_classes
    if not size and name != "latents":  # a DataSpec used on its own (a run spec sets the model's size)
        size = 32
    flip = bool(data_spec.flip) and split == "train"
    if name == "shapes":
        from dimr_lab.data.shapes import SHAPE_NAMES, ShapesDataset

        return ShapesDataset(data_spec.train_size, size, k or len(SHAPE_NAMES), seed=seed, split=split, flip=flip,
                             shape_size=tuple(data_spec.shape_size), jitter=data_spec.shape_jitter,
                             palette=data_spec.shape_palette)
    if name == "digits":
        from dimr_lab.data.digits import DigitsDataset

        if k not in (0, 10):
            raise SpecError(f"digits has 10 classes, got {k} (use 0 or 10)", key="data.num_classes")
        return DigitsDataset(size, seed=seed, split=split, flip=flip)
    if name == "folder":
        from dimr_lab.data.folder import FolderDataset

        # one tree serves both splits: an ImageFolder has no held-out part of its own
        ds = FolderDataset(data_spec.root, size, flip=flip)
        if k and k != ds.num_classes:
            raise SpecError(f"is {k} but {data_spec.root} has {ds.num_classes} class folders", key="data.num_classes")
        return ds
    if name == "latents":
        from dimr_lab.data.latents import LatentsDataset

        return LatentsDataset(data_spec.root, image_size=size, num_classes=k, split=split)
    raise SpecError(unknown_name_message("dataset", name, DATASET_NAMES), key="data.name")


def prepare_latents(src_folder, out_dir, *, vae, image_size: int = 256, batch_size: int = 32, flip: bool = True):
    """Encode an ImageFolder tree into the released latents layout (see `dimr_lab.data.latents`)."""
    from dimr_lab.data.latents import prepare_latents as _prepare

    return _prepare(src_folder, out_dir, vae=vae, image_size=image_size, batch_size=batch_size, flip=flip)


def dataset_identity(data_spec: "DataSpec", seed: int = 0) -> dict:
    """What makes a dataset's images what they are (keys caches of models trained on it)."""
    ident = {"name": data_spec.name, "image_size": data_spec.image_size, "num_classes": data_spec.num_classes,
             "seed": seed}
    if data_spec.name == "shapes":
        ident["train_size"] = data_spec.train_size
        ident.update(shape_size=list(data_spec.shape_size), shape_jitter=data_spec.shape_jitter,
                     shape_palette=data_spec.shape_palette)
    if data_spec.name in ("folder", "latents"):
        from pathlib import Path

        ident["root"] = str(Path(data_spec.root).expanduser().resolve())
    return ident


__all__ = ["DATASET_NAMES", "build_dataset", "dataset_identity", "prepare_latents"]
