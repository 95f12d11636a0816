"""Pre-extracted VAE latents in the released code's layout, and a writer for that layout.

Layout (as DiMR's / U-ViT's `scripts/extract_imagenet_feature.py` writes it): a flat folder of
`{idx}.npy`, idx = 0..N-1, each a pickled 2-object array `(moments, label)` where `moments` is the VAE
encoder's float32 (2C, h, w) output, the posterior mean and log-variance stacked on channels. Each batch
of B images is written as B originals followed by their B horizontal flips, so flips are baked in.
Readers draw `z = scale * (mean + exp(logvar / 2) * noise)` with scale 0.18215 (Stable Diffusion's VAE).
We add a `meta.json` sidecar (class names, sizes, scale); the released layout has none and still loads.
"""

from __future__ import annotations

import json
import os
import re
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dimr_lab.errors import SpecError, UserError

SCALE_FACTOR = 0.18215
META_FILE = "meta.json"
_NPY = re.compile(r"^(\d+)\.npy$")


def _count_files(root: Path) -> int:
    """N such that 0.npy..N-1.npy all exist; refuses gaps (a half-written extraction)."""
    indices = sorted(int(m.group(1)) for name in os.listdir(root) if (m := _NPY.match(name)))
    if not indices:
        raise UserError(f"{root}: no latent files (expected 0.npy, 1.npy, ... from prepare-latents)")
    if indices[-1] != len(indices) - 1:
        missing = next(i for i, j in enumerate(indices) if i != j)
        raise UserError(f"{root}: latent files are not contiguous ({missing}.npy is missing of {indices[-1] + 1})")
    return len(indices)


_SAFE_GLOBALS = {
    (mod, name)
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, scalars and plain containers only: a latent file cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_latent_file(path: Path) -> tuple[np.ndarray, int]:
    """(moments (2C, h, w) float32, label) of one `{idx}.npy` file (an object array, read without pickle's
    freedom to import anything)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            if dtype.hasobject:
                pair = _ArrayOnlyUnpickler(f).load()
            else:
                pair = np.fromfile(f, dtype=dtype).reshape(shape)
        moments, label = pair[0], pair[1]
    except Exception as err:  # truncated, foreign or unsafe files
        raise UserError(f"{path}: not a latent file of the (moments, label) layout ({err})") from None
    return np.asarray(moments, dtype=np.float32), int(label)


class LatentsDataset(Dataset):
    """(scaled latent (C, h, w), label) from a latents folder; 'train' samples the posterior, 'test' takes its mean."""

    kind = "latents"

    def __init__(self, root: str | Path, *, image_size: int | None = None, num_classes: int = 0,
                 split: str = "train", key: str = "data.root"):
        root = Path(root).expanduser()
        if not str(root) or not root.is_dir():
            raise SpecError(f"latents folder {str(root)!r} does not exist or is not a directory", key=key)
        self.root, self.split = root, split
        self.length = _count_files(root)
        meta = {}
        if (root / META_FILE).is_file():
            try:
                meta = json.loads((root / META_FILE).read_text())
            except (OSError, ValueError) as err:
                raise UserError(f"{root / META_FILE}: unreadable ({err})") from err
        self.meta = meta
        moments, _ = load_latent_file(root / "0.npy")
        if moments.ndim != 3 or moments.shape[0] % 2:
            raise UserError(f"{root / '0.npy'}: moments of shape {moments.shape}, expected (2C, h, w)")
        self.channels, self.image_size = moments.shape[0] // 2, moments.shape[-1]
        if image_size is not None and image_size != self.image_size:
            raise SpecError(f"is {image_size} but the latents in {root} are {self.image_size}x{self.image_size}",
                            key="data.image_size")
        self.scale_factor = float(meta.get("scale_factor", SCALE_FACTOR))
        if num_classes:
            self.num_classes = num_classes
        elif "num_classes" in meta:
            self.num_classes = int(meta["num_classes"])
        else:
            raise SpecError(f"{root} has no {META_FILE}; set data.num_classes (1000 for ImageNet)",
                            key="data.num_classes")
        self.class_names = tuple(meta.get("classes", [str(i) for i in range(self.num_classes)]))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        moments, label = load_latent_file(self.root / f"{i}.npy")
        mean, logvar = torch.from_numpy(moments).chunk(2, dim=0)  # (C, h, w) each
        if self.split == "train":
            # a fresh posterior sample each time, as the released training does
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            mean = mean + std * torch.randn_like(std)
        return self.scale_factor * mean, label  # (C, h, w)


def _load_vae(vae):
    """An AutoencoderKL from a model or a diffusers folder; UserError when diffusers or the folder is missing."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise UserError("prepare-latents needs diffusers: pip install 'dimr-lab[latents]'") from err
    if isinstance(vae, (str, Path)):
        path = Path(vae).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(f"VAE {str(path)!r}: not a diffusers AutoencoderKL folder (no config.json)")
        try:
            vae = AutoencoderKL.from_pretrained(str(path), low_cpu_mem_usage=False)  # no accelerate needed
        except Exception as err:  # diffusers raises many kinds for a bad folder
            raise UserError(f"VAE {str(path)!r}: cannot load ({err})") from err
    if not hasattr(vae, "encode"):
        raise UserError(f"vae must be a diffusers AutoencoderKL or its folder, got {type(vae).__name__}")
    return vae


_decoders: dict[str, object] = {}


@torch.no_grad()
def decode_latents(z: torch.Tensor, data_spec, *, batch_size: int = 16) -> torch.Tensor:
    """Scaled latents (N, C, h, w) -> images (N, 3, h*8, w*8) in [-1, 1] through `data.vae`'s decoder."""
    if not data_spec.vae:
        raise SpecError("images from latent samples need the VAE that encoded them: set data.vae to its "
                        "diffusers AutoencoderKL folder (or eval.enabled = false)", key="data.vae")
    key = str(Path(data_spec.vae).expanduser().resolve())
    if key not in _decoders:
        _decoders[key] = _load_vae(data_spec.vae).eval()
    vae = _decoders[key]
    scale = float(getattr(getattr(vae, "config", None), "scaling_factor", SCALE_FACTOR))
    device = next(vae.parameters()).device
    out = [vae.decode(chunk.to(device) / scale).sample.float().cpu() for chunk in z.split(batch_size)]
    return torch.cat(out).clamp(-1, 1)  # (N, 3, H, W)


@torch.no_grad()
def prepare_latents(src_folder, out_dir, *, vae, image_size: int = 256, batch_size: int = 32,
                    flip: bool = True) -> dict:
    """Encode an ImageFolder tree into out_dir in the released latents layout; returns the meta dict."""
    from dimr_lab.data.folder import FolderDataset

    data = FolderDataset(src_folder, image_size, flip=False, key="SRC")
    vae = _load_vae(vae)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if any(_NPY.match(name) for name in os.listdir(out)):
        raise UserError(f"{out}: already holds latent files; choose an empty folder")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = vae.to(device).eval()
    dtype = next(vae.parameters()).dtype
    idx = 0
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        x = torch.stack([im for im, _ in items])  # (B, 3, S, S) in [-1, 1]
        y = torch.tensor([lb for _, lb in items])  # (B,)
        if flip:
            x, y = torch.cat([x, x.flip(-1)]), torch.cat([y, y])  # (2B, 3, S, S): originals then flips
        # the posterior's raw parameters: mean and log-variance stacked on channels
        moments = vae.encode(x.to(device, dtype)).latent_dist.parameters.float().cpu().numpy()  # (B', 2C, h, w)
        for m, lb in zip(moments, y.tolist()):
            pair = np.empty(2, dtype=object)  # an explicit object pair: numpy no longer builds ragged arrays
            pair[0], pair[1] = m, np.int64(lb)
            np.save(out / f"{idx}.npy", pair)
            idx += 1
    meta = {
        "format": "dimr-lab latents 1 (released DiMR/U-ViT layout)",
        "count": idx, "num_classes": data.num_classes, "classes": list(data.class_names),
        "image_size": image_size, "latent_size": int(moments.shape[-1]), "channels": int(moments.shape[1] // 2),
        "flip": flip, "scale_factor": float(getattr(getattr(vae, "config", None), "scaling_factor", SCALE_FACTOR)),
        "source": str(Path(src_folder).expanduser().resolve()),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def build(spec, split: str = "train", seed: int = 0) -> LatentsDataset:
    """Pre-extracted latents at data.root (flips are baked in by prepare-latents)."""
    return LatentsDataset(spec.root, image_size=spec.image_size or None, num_classes=spec.num_classes, split=split)
