"""scikit-learn's bundled 8x8 handwritten digits, upscaled: a tiny real dataset that needs no download."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dimr_lab.data.memory import InMemoryImages
from dimr_lab.errors import UserError

TEST_FRACTION = 0.2


class DigitsDataset(InMemoryImages):
    """10 digit classes; 3 identical channels by default (the pixel pipeline and evaluator are RGB), or 1."""

    kind = "pixels"

    def __init__(self, image_size: int = 32, *, seed: int = 0, split: str = "train", flip: bool = False,
                 channels: int = 3, limit: int | None = None):
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise UserError("data.name = 'digits' needs scikit-learn: pip install 'dimr-lab[digits]'") from err
        if channels not in (1, 3):
            raise UserError(f"digits: channels must be 1 or 3, got {channels}")
        bunch = load_digits()
        images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)  # (1797, 8, 8) in [0, 1]
        labels = torch.from_numpy(bunch.target.astype(np.int64))  # (1797,)
        # a seeded split so train and test never share an image
        order = torch.from_numpy(np.random.default_rng(seed).permutation(len(labels)))
        n_test = int(round(len(labels) * TEST_FRACTION))
        keep = order[:n_test] if split == "test" else order[n_test:]
        if limit is not None:
            keep = keep[:limit]
        x = F.interpolate(images[keep][:, None], size=(image_size, image_size), mode="bilinear",
                          align_corners=False)  # (N, 1, S, S)
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)  # (N, 1, S, S)
        self.images = x.expand(-1, channels, -1, -1).contiguous()  # (N, C, S, S) uint8
        self.labels = labels[keep]  # (N,)
        self.image_size, self.channels, self.num_classes = image_size, channels, 10
        self.seed, self.split, self.flip = seed, split, flip
        self.class_names = tuple(str(i) for i in range(10))


def build(spec, split: str = "train", seed: int = 0) -> DigitsDataset:
    """scikit-learn's digits at data.image_size (10 classes; a seeded train/test split)."""
    from dimr_lab.errors import SpecError

    if spec.num_classes not in (0, 10):
        raise SpecError(f"digits has 10 classes, got {spec.num_classes} (use 0 or 10)", key="data.num_classes")
    return DigitsDataset(spec.image_size or 32, seed=seed, split=split, flip=bool(spec.flip) and split == "train")
