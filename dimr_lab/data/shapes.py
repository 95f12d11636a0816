"""Procedural class-conditional shapes: one hard-edged shape per image, class = shape type."""

from __future__ import annotations

import numpy as np
import torch

from dimr_lab.data.memory import InMemoryImages

PALETTES = ("contrast", "random")
TEXTURES = ("none", "stripes")
SHAPE_NAMES = ("circle", "square", "triangle", "cross", "ring", "bars", "diamond", "star")

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# pixels rendered at a time (images x side^2): the renderer's float maps take ~3 KiB a pixel, so a fixed
# 1024 images took 3 GiB at side 256 and 12 GiB at 512; this keeps 1024 images a chunk at side 32
CHUNK_PIXELS = 1024 * 32 * 32


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash (splitmix64): the same key gives the same bits whatever the batch."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def _uniform(seed: int, stream: int, index: np.ndarray, slot: int) -> np.ndarray:
    """Uniform [0, 1) numbers that depend only on (seed, stream, index, slot)."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) * np.uint64(0x100000001B3) + np.uint64(stream))
        key = _splitmix64(key ^ (index.astype(np.uint64) * np.uint64(64) + np.uint64(slot)))
    return (key >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _masks(cls: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hard masks (N, S, S) of each image's shape in its own unit coordinates (u right, v down)."""
    rho = torch.sqrt(u * u + v * v)  # (N, S, S)
    au, av = u.abs(), v.abs()
    inside = (au <= 1) & (av <= 1)
    theta = torch.atan2(v, u) + torch.pi / 2  # 0 at the top point of the star
    phase = torch.remainder(theta, 2 * torch.pi / 5) / (2 * torch.pi / 5)
    star_radius = 0.42 + 0.58 * (2 * phase - 1).abs()  # 1 at the 5 points, 0.42 between them
    masks = torch.stack([
        rho <= 1,                                               # circle
        torch.maximum(au, av) <= 0.8,                           # square
        (v <= 0.8) & (au <= (v + 1) * 0.55),                    # triangle, apex up
        inside & ((au <= 0.3) | (av <= 0.3)),                   # cross
        (rho <= 1) & (rho >= 0.55),                             # ring
        inside & (torch.floor((v + 1) / 0.4).remainder(2) == 0),  # horizontal bars
        au + av <= 1,                                           # diamond
        rho <= star_radius,                                     # star
    ])  # (8, N, S, S)
    return masks[cls % len(SHAPE_NAMES), torch.arange(len(cls))]  # (N, S, S)


def render_shapes(indices: np.ndarray, image_size: int, num_classes: int, seed: int, stream: int,
                  size: tuple[float, float] = (0.38, 0.48), jitter: float = 0.2,
                  palette: str = "contrast", texture: str = "none", period: float = 3.0) -> torch.Tensor:
    """uint8 images (N, 3, S, S) of the given indices; class = index % num_classes.

    size: the radius range as a fraction of the side; jitter: the share of the free room (where the
    whole shape stays inside) that the centre moves in, 0 = always centred; palette: 'contrast' (a light
    shape on a dark ground) or 'random' (two random colours); texture: 'stripes' fills the shape with hard
    stripes `period` pixels apart at an angle set by the class (pi * class / num_classes) and a random
    phase: detail finer than a patch, which a network must resolve below its token grid."""
    if palette not in PALETTES:
        raise ValueError(f"unknown palette {palette!r}; known: {', '.join(PALETTES)}")
    if texture not in TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")
    idx = np.asarray(indices, dtype=np.int64)
    s = image_size
    r = size[0] + (size[1] - size[0]) * _uniform(seed, stream, idx, 0)  # radius as a fraction of the side
    cx = 0.5 + jitter * (0.5 - r) * (2 * _uniform(seed, stream, idx, 1) - 1)  # keeps the whole shape inside
    cy = 0.5 + jitter * (0.5 - r) * (2 * _uniform(seed, stream, idx, 2) - 1)
    bg = np.stack([_uniform(seed, stream, idx, 3 + c) for c in range(3)], 1)  # (N, 3) in [0, 1)
    fg = np.stack([_uniform(seed, stream, idx, 6 + c) for c in range(3)], 1)  # (N, 3) in [0, 1)
    if palette == "contrast":
        # a light shape (every channel 0.6..1) on a dark ground (0..0.35): the class's mean image is its
        # silhouette, so the label tells a denoiser something even where the noise hides the outline
        bg, fg = 0.35 * bg, 0.6 + 0.4 * fg
    else:
        # 'random': both colours anywhere, foreground 0.35..0.65 away from the ground on every channel
        # (mod 1); every class then has the same mean image and only the outline carries the label
        fg = np.remainder(bg + 0.35 + 0.3 * fg, 1.0)
    bg8 = torch.from_numpy(np.round(bg * 255).astype(np.uint8))  # (N, 3)
    fg8 = torch.from_numpy(np.round(fg * 255).astype(np.uint8))  # (N, 3)

    grid = (torch.arange(s, dtype=torch.float32) + 0.5) / s  # pixel centres in [0, 1]
    rr = torch.from_numpy(r).float()[:, None, None]
    u = (grid[None, None, :] - torch.from_numpy(cx).float()[:, None, None]) / rr  # (N, 1, S)
    v = (grid[None, :, None] - torch.from_numpy(cy).float()[:, None, None]) / rr  # (N, S, 1)
    u, v = torch.broadcast_tensors(u, v)  # (N, S, S)
    cls = torch.from_numpy(idx % num_classes)
    mask = _masks(cls, u, v)  # (N, S, S)
    # hard select between two colours: exactly two pixel values per image, no anti-aliasing
    out = torch.where(mask[:, None], fg8[:, :, None, None], bg8[:, :, None, None])  # (N, 3, S, S)
    if texture == "stripes":
        angle = torch.pi * cls.double() / num_classes  # (N,) the class sets the stripes' direction
        phase = torch.from_numpy(2 * np.pi * _uniform(seed, stream, idx, 9))  # (N,)
        px = torch.arange(s, dtype=torch.float64) + 0.5  # pixel centres, in pixels
        proj = px[None, None, :] * angle.cos()[:, None, None] + px[None, :, None] * angle.sin()[:, None, None]
        dark = torch.cos(2 * torch.pi * proj / float(period) + phase[:, None, None]) < 0  # (N, S, S)
        mid8 = ((fg8.int() + bg8.int()) // 2).to(torch.uint8)  # (N, 3) the stripes' colour
        out = torch.where((mask & dark)[:, None], mid8[:, :, None, None], out)
    return out


class ShapesDataset(InMemoryImages):
    """Class-conditional geometric shapes, rendered once at construction and kept as uint8."""

    kind = "pixels"
    channels = 3

    def __init__(self, size: int, image_size: int = 32, num_classes: int = 8, *, seed: int = 0,
                 split: str = "train", flip: bool = False, shape_size: tuple[float, float] = (0.38, 0.48),
                 jitter: float = 0.2, palette: str = "contrast", texture: str = "none", period: float = 3.0):
        if not 1 <= num_classes <= len(SHAPE_NAMES):
            from dimr_lab.errors import SpecError

            raise SpecError(f"shapes has at most {len(SHAPE_NAMES)} classes, got {num_classes}", key="data.num_classes")
        self.image_size, self.num_classes, self.seed, self.split = image_size, num_classes, seed, split
        self.flip = flip
        self.class_names = SHAPE_NAMES[:num_classes]
        stream = {"train": 0, "test": 1}[split]  # the test split draws from its own stream
        self.shape_size, self.jitter, self.palette = (float(shape_size[0]), float(shape_size[1])), float(jitter), palette
        chunk = max(1, CHUNK_PIXELS // (image_size * image_size))
        self.images = torch.cat([render_shapes(np.arange(i, min(i + chunk, size)), image_size, num_classes, seed,
                                               stream, self.shape_size, self.jitter, palette, texture, period)
                                 for i in range(0, size, chunk)])  # (N, 3, S, S) uint8, chunked to bound memory
        self.labels = torch.arange(size) % num_classes  # (N,) balanced by construction


def build(spec, split: str = "train", seed: int = 0) -> ShapesDataset:
    """The shapes of a DataSpec (the test split renders its own images from another stream)."""
    return ShapesDataset(spec.train_size, spec.image_size or 32, spec.num_classes or len(SHAPE_NAMES), seed=seed,
                         split=split, flip=bool(spec.flip) and split == "train", shape_size=tuple(spec.shape_size),
                         jitter=spec.shape_jitter, palette=spec.shape_palette, texture=spec.texture,
                         period=spec.texture_period)
