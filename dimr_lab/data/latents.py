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
import math
import os
import re
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dimr_lab.errors import SpecError, UserError

SCALE_FACTOR = 0.18215
META_FILE = "meta.json"
_NPY = re.compile(r"^(\d+)\.npy\Z")


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
    freedom to import anything). The label must be an integer: a float or an array in its place is a file of
    another layout, and int() would truncate the one and fail on the other."""
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
        moments, label = pair[0], np.asarray(pair[1])
        if len(pair) != 2 or label.ndim != 0 or label.dtype.kind not in "iu":
            raise ValueError(f"expected 2 objects, the second an integer label; got {len(pair)}, the second "
                             f"{label.dtype} of shape {label.shape}")
        moments = np.asarray(moments)
        if moments.dtype.kind != "f":  # complex lost its imaginary part (a warning), integers passed as latents
            raise ValueError(f"moments of dtype {moments.dtype}; expected floating point (the VAE's float32)")
        moments = moments.astype(np.float32, copy=False)
    except Exception as err:  # truncated, foreign or unsafe files
        raise UserError(f"{path}: not a latent file of the (moments, label) layout ({err})") from None
    return moments, int(label)


def _read_meta(root: Path) -> dict:
    """meta.json of a latents folder ({} when absent), its values checked: a wrong one is one line naming it."""
    path = root / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object (as prepare-latents writes), got a {type(meta).__name__}")

    def positive_int(key: str, allowed: str = "a positive integer") -> None:
        value = meta.get(key)
        if key in meta and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"{path}: {key} is {value!r}; expected {allowed}")

    positive_int("num_classes")
    positive_int("count", "a positive integer, the number of latent files")
    if "scale_factor" in meta:
        scale = meta["scale_factor"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise UserError(f"{path}: scale_factor is {scale!r}; expected a finite number > 0 (0.18215 for "
                            f"Stable Diffusion's VAE)")
    classes = meta.get("classes")
    if "classes" in meta and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise UserError(f"{path}: classes is {classes!r:.80}; expected a list of class names")
    return meta


class LatentsDataset(Dataset):
    """(scaled latent (C, h, w), label) from a latents folder; 'train' samples the posterior, 'test' takes its mean."""

    kind = "latents"
    # an item draws its own random numbers (the posterior sample): the trainer reads each under an RNG seeded
    # by (seed, epoch, index), so every rank and data worker draws what one process draws
    draws_per_item = True

    def __init__(self, root: str | Path, *, image_size: int | None = None, num_classes: int = 0,
                 split: str = "train", key: str = "data.root"):
        root = Path(root).expanduser()
        if not str(root) or not root.is_dir():
            raise SpecError(f"latents folder {str(root)!r} does not exist or is not a directory", key=key)
        self.root, self.split = root, split
        self.length = _count_files(root)
        self.meta = meta = _read_meta(root)
        if "count" in meta and meta["count"] != self.length:
            raise UserError(f"{root / META_FILE}: count is {meta['count']} but the folder holds {self.length} latent "
                            f"files (0.npy..{self.length - 1}.npy); a copy or an extraction is incomplete")
        if num_classes and "num_classes" in meta and num_classes != meta["num_classes"]:
            raise SpecError(f"is {num_classes} but {root / META_FILE} says the latents have {meta['num_classes']} "
                            f"classes", key="data.num_classes")
        if num_classes:
            self.num_classes, self._classes_key = num_classes, "data.num_classes"
        elif "num_classes" in meta:
            self.num_classes, self._classes_key = meta["num_classes"], f"num_classes of {root / META_FILE}"
        else:
            raise SpecError(f"{root} has no {META_FILE}; set data.num_classes (1000 for ImageNet)",
                            key="data.num_classes")
        if "classes" in meta and len(meta["classes"]) != self.num_classes:  # grids would name samples wrongly
            raise UserError(f"{root / META_FILE}: classes lists {len(meta['classes'])} names, but "
                            f"{self._classes_key} = {self.num_classes}; expected one name per class")
        moments, label = load_latent_file(root / "0.npy")
        if moments.ndim != 3 or moments.shape[0] % 2 or moments.shape[1] != moments.shape[2]:
            raise UserError(f"{root / '0.npy'}: moments of shape {moments.shape}, expected (2C, h, h)")
        # the first file sets the shape every item must have (the network's input)
        self.moments_shape = moments.shape
        self.channels, self.image_size = moments.shape[0] // 2, moments.shape[-1]
        self._check(root / "0.npy", moments, label)
        if image_size is not None and image_size != self.image_size:
            raise SpecError(f"is {image_size} but the latents in {root} are {self.image_size}x{self.image_size}",
                            key="data.image_size")
        self.scale_factor = float(meta.get("scale_factor", SCALE_FACTOR))
        self.class_names = tuple(meta.get("classes", [str(i) for i in range(self.num_classes)]))

    def _check(self, path: Path, moments: np.ndarray, label: int) -> None:
        """Refuse, in one line, a file that does not fit the dataset: a label outside the classes indexes past
        the network's label table (and at num_classes trains as the null label), moments of another shape than
        the first file's cannot be stacked into a batch, and NaN or inf trains to NaN. Checked on every read:
        a folder of a million files is not scanned up front."""
        if moments.shape != self.moments_shape:
            raise UserError(f"{path}: moments of shape {moments.shape}, but 0.npy's are {self.moments_shape}; every "
                            f"file of a latents folder must have the same shape")
        if not 0 <= label < self.num_classes:
            raise UserError(f"{path}: label {label} is outside 0..{self.num_classes - 1} "
                            f"({self._classes_key} = {self.num_classes})")
        if not np.isfinite(moments).all():
            raise UserError(f"{path}: moments hold NaN or inf; expected finite values (re-extract this file)")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        path = self.root / f"{i}.npy"
        moments, label = load_latent_file(path)
        self._check(path, moments, label)
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
    # diffusers reads weights through `safetensors.torch` after only `import safetensors`; in some releases
    # (0.29 to 0.32) nothing of its own imports that submodule (accelerate does; we load without it)
    import safetensors.torch  # noqa: F401
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


def _first_missing(path: Path) -> Path | None:
    """The outermost of path and its parents that does not exist (None when path exists)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            return missing
        missing = p
    return missing


@torch.no_grad()
def prepare_latents(src_folder, out_dir, *, vae, image_size: int = 256, batch_size: int = 32,
                    flip: bool = True) -> dict:
    """Encode an ImageFolder tree into out_dir in the released latents layout; returns the meta dict.

    All or nothing: the files are written into a temporary sibling folder, renamed onto out_dir once meta.json
    is in it, so a broken image half-way (or Ctrl-C) leaves no half-filled out_dir to refuse the next attempt.
    A killed process leaves only the hidden `.OUT.partial-*` sibling, which no reader or later run looks at.
    The files reach the disk before the rename (one `sync` once they are all written, then the folder's fsync;
    the parent's after it), so a power loss cannot leave a complete-looking out_dir of empty or short files.
    One sync, not an fsync per file: ImageNet is 1.28M files, and a network filesystem's fsync can take
    milliseconds each."""
    from dimr_lab.atomic import _umask, fsync_dir, make_dirs
    from dimr_lab.data.folder import FolderDataset
    from dimr_lab.spec.preflight import check_out_dir

    data = FolderDataset(src_folder, image_size, flip=False, key="SRC")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose a new or empty folder")
    if out.is_dir() and (names := os.listdir(out)):
        if any(_NPY.match(name) or name == META_FILE for name in names):
            raise UserError(f"{out}: already holds latent files; choose a new or empty folder")
        raise UserError(f"{out}: is not empty ({len(names)} entries); choose a new or empty folder")
    check_out_dir(out)  # a file above it, an unwritable folder: said now, before the VAE loads
    vae = _load_vae(vae)
    created = _first_missing(out.parent)
    make_dirs(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # a shared dataset folder, not mkdtemp's 0700
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
            if not np.isfinite(moments).all():  # a reader would refuse the files: stop here, naming the images
                raise UserError(f"{data.files[start]} .. {data.files[start + len(items) - 1]}: the VAE encodes "
                                f"these images to NaN or inf")
            for m, lb in zip(moments, y.tolist()):
                pair = np.empty(2, dtype=object)  # an explicit object pair: numpy no longer builds ragged arrays
                pair[0], pair[1] = m, np.int64(lb)
                np.save(tmp / f"{idx}.npy", pair)
                idx += 1
        meta = {
            "format": "dimr-lab latents 1 (released DiMR/U-ViT layout)",
            "count": idx, "num_classes": data.num_classes, "classes": list(data.class_names),
            "image_size": image_size, "latent_size": int(moments.shape[-1]), "channels": int(moments.shape[1] // 2),
            "flip": flip, "scale_factor": float(getattr(getattr(vae, "config", None), "scaling_factor", SCALE_FACTOR)),
            "source": str(Path(src_folder).expanduser().resolve()),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        os.sync()  # every file's bytes, before the rename that makes them the dataset
        fsync_dir(tmp)  # and the folder's entries
        os.rename(tmp, out)  # onto a missing or an empty folder
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(created or tmp, ignore_errors=True)
        raise
    return meta


def build(spec, split: str = "train", seed: int = 0) -> LatentsDataset:
    """Pre-extracted latents at data.root (flips are baked in by prepare-latents)."""
    return LatentsDataset(spec.root, image_size=spec.image_size or None, num_classes=spec.num_classes, split=split)
