"""An ImageFolder tree (root/<class>/<image>), centre-cropped and resized the way ADM prepares ImageNet."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dimr_lab.errors import SpecError, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")


def center_crop_resize(image, image_size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX while the short side is >= 2x the target, BICUBIC to it, crop the centre."""
    from PIL import Image

    # repeated 2x BOX reduction first: a single bicubic resize from far above would alias
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize((round(image.size[0] * scale), round(image.size[1] * scale)), resample=Image.BICUBIC)
    arr = np.asarray(image)  # (H, W, 3) uint8
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top:top + image_size, left:left + image_size]  # (S, S, 3)


def to_rgb(image):
    """The image in mode RGB, 8 bits a channel. 16-bit grayscale (modes "I;16*", and "I", in which older
    Pillows opened 16-bit PNGs) is scaled from 0..65535 to 0..255 first: convert("RGB") clips its values at
    255, so all but the darkest pixels came out white."""
    from PIL import Image

    if image.mode == "I" or image.mode.startswith("I;16"):
        arr = np.asarray(image).astype(np.float64)  # (H, W)
        image = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8))  # 65535 / 255 = 257
    return image.convert("RGB")


def _walk(folder: Path) -> list[Path]:
    """Every entry under folder, through symbolic links to folders as through the class folders themselves
    (Path.rglob does not follow them before Python 3.13); a folder reached twice (a link loop) once."""
    out, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        out += [Path(top) / f for f in files] + [Path(top) / d for d in dirs]
    return out


def list_image_folder(root: str | Path, key: str = "data.root") -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, class names) of root/<class>/**/<image>; classes sorted by folder name."""
    root = Path(root).expanduser()
    if not str(root) or not root.is_dir():
        raise SpecError(f"image folder {str(root)!r} does not exist or is not a directory", key=key)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    files, labels = [], []
    for k, name in enumerate(classes):
        # hidden files and folders are left out, as hidden class folders are: macOS's ._x.jpg resource forks
        # and .ipynb_checkpoints copies carry image suffixes but are no images of the class
        named = [p for p in _walk(root / name) if p.suffix.lower() in IMAGE_EXTENSIONS
                 and not any(part.startswith(".") for part in p.relative_to(root / name).parts)]
        found = sorted(p for p in named if p.is_file())
        if len(found) < len(named):  # a dangling link skipped would drop an image of the tree without a word
            broken = next((p for p in named if p.is_symlink() and not p.exists()), None)
            if broken is not None:
                raise UserError(f"{broken}: a symbolic link to {os.readlink(broken)!r}, which does not exist")
        files += found
        labels += [k] * len(found)
    if not files:
        raise UserError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) under its class folders")
    seen = set(labels)
    empty = [name for k, name in enumerate(classes) if k not in seen]
    if empty:  # still a class: the network, the balanced evaluation labels and the classifier would count it
        raise UserError(f"{root / empty[0]}: a class folder without images ({', '.join(IMAGE_EXTENSIONS)})"
                        + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "") + "; remove it or add images")
    return files, labels, classes


class FolderDataset(Dataset):
    """Images of an ImageFolder tree in [-1, 1]; random horizontal flips when `flip`."""

    kind = "pixels"
    channels = 3

    def __init__(self, root: str | Path, image_size: int, *, flip: bool = False, key: str = "data.root"):
        self.files, labels, self.class_names = list_image_folder(root, key)
        self.labels = torch.tensor(labels)  # (N,)
        self.root, self.image_size, self.flip = Path(root), image_size, flip
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self.files)

    def load_uint8(self, i: int) -> torch.Tensor:
        """Image i as uint8 (3, S, S), cropped and resized, never flipped."""
        from PIL import Image

        try:
            with Image.open(self.files[i]) as im:
                arr = center_crop_resize(to_rgb(im), self.image_size)  # (S, S, 3)
        # Pillow refuses an image over Image.MAX_IMAGE_PIXELS (a decompression bomb guard) with an error
        # that is not an OSError; its message gives the size and the limit
        except (OSError, Image.DecompressionBombError) as err:
            raise UserError(f"{self.files[i]}: cannot read image ({err})") from err
        return torch.from_numpy(np.array(arr)).permute(2, 0, 1)  # (3, S, S); a copy: PIL arrays are read-only

    def __getitem__(self, i: int):
        x = self.load_uint8(i).float() / 127.5 - 1  # (3, S, S) in [-1, 1]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self.labels[i])


def build(spec, split: str = "train", seed: int = 0) -> FolderDataset:
    """An ImageFolder tree at data.root; one tree serves both splits (it has no held-out part of its own)."""
    from dimr_lab.errors import SpecError

    ds = FolderDataset(spec.root, spec.image_size or 32, flip=bool(spec.flip) and split == "train")
    if spec.num_classes and spec.num_classes != ds.num_classes:
        raise SpecError(f"is {spec.num_classes} but {spec.root} has {ds.num_classes} class folders",
                        key="data.num_classes")
    return ds
