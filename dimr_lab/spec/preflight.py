"""Checks a run spec needs from the filesystem and the launch, made before anything is written or submitted:
the data folder, the Inception weights and reference statistics, the VAE, the output folder, and
processes that fit the batch. torch-free (numpy reads the reference statistics' header only)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

from dimr_lab.errors import SpecError, UserError
from dimr_lab.registry import DATASETS


def check_files(spec: Any, *, file: str | None = None, samples: bool = True) -> None:
    """Every file and folder the spec names exists and looks right; one SpecError naming the key otherwise.
    `samples`: the command ends with samples as images (a run's sample grid, an evaluation)."""
    d, ev = spec.data, spec.eval
    if "data.root" in DATASETS.entry(d.name).keys:
        root = Path(d.root).expanduser()
        if not d.root:
            raise SpecError(f"dataset {d.name!r} reads a folder: set data.root", file=file, key="data.root")
        if not root.is_dir():
            raise SpecError(f"{d.root!r} is not a folder", file=file, key="data.root")
    if d.vae and not Path(d.vae).expanduser().is_dir():
        raise SpecError(f"{d.vae!r} is not a folder (a diffusers AutoencoderKL)", file=file, key="data.vae")
    if DATASETS.meta(d.name, "kind") == "latents" and samples and not d.vae:
        # found now, not after training: even with eval.enabled = false a run ends with a sample grid
        raise SpecError("latent samples become images (the sample grid, the evaluation) through the VAE that "
                        "encoded them: set data.vae to its diffusers AutoencoderKL folder", file=file, key="data.vae")
    if not ev.enabled:
        return
    if ev.feature_extractor == "inception-v3-compat":
        if not ev.inception_weights:
            raise SpecError("is empty: torch-fidelity would download the Inception weights, which is not possible "
                            "here; set a local copy (or use eval.feature_extractor = 'classifier')", file=file,
                            key="eval.inception_weights")
        if not Path(ev.inception_weights).expanduser().is_file():
            raise SpecError(f"{ev.inception_weights!r} not found", file=file, key="eval.inception_weights")
    if ev.reference_stats:
        check_reference_stats(ev.reference_stats, file=file)


def check_reference_stats(path: str, *, file: str | None = None) -> None:
    """An .npz holding mu (D,) and sigma (D, D), read without loading the arrays."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SpecError(f"{path!r} not found", file=file, key="eval.reference_stats")
    try:
        with zipfile.ZipFile(p) as z:
            names = {n.removesuffix(".npy") for n in z.namelist()}
    except (zipfile.BadZipFile, OSError) as err:
        raise SpecError(f"{path!r} is not an .npz file ({err})", file=file, key="eval.reference_stats") from None
    if not {"mu", "sigma"} <= names:
        raise SpecError(f"{path!r} has {sorted(names)}, needs mu and sigma (ADM's reference batch format)",
                        file=file, key="eval.reference_stats")


def _check_writable_from(start: Path, label: str) -> None:
    """The nearest existing folder at or above `start` is a folder this process can write into."""
    probe = start
    while not probe.exists():  # False too below a file (ENOTDIR): go up to what is there
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{label}: cannot be created ({probe} is {'a file, ' if probe.is_file() else ''}not a folder)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{label}: cannot write there ({probe} is not writable)")


def check_out_dir(path: str | Path, option: str = "") -> Path:
    """An output folder that is, or can become, a writable folder; one UserError naming it (and the option
    that gave it) otherwise."""
    path = Path(path)
    label = f"{option} {path}" if option else str(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{label}: exists and is not a folder")
    _check_writable_from(path, label)
    return path


def check_out_file(path: str | Path, option: str = "") -> Path:
    """An output file whose folder is, or can become, a writable folder (nothing above it a file); one
    UserError naming the option, the path and what stands in the way otherwise. Made before the work that
    the file would hold, so that a path that cannot be written is refused at once, with nothing written."""
    path = Path(path)
    _check_writable_from(path.parent, f"{option} {path}" if option else str(path))
    return path


def check_processes(spec: Any, world_size: int) -> None:
    """The global batch divides over the processes of a job."""
    if world_size > 1 and spec.train.batch_size % world_size:
        raise SpecError(f"{spec.train.batch_size} does not divide over {world_size} processes",
                        key="train.batch_size")


def check_compiler(spec: Any, device: Any, keys: tuple[str, ...] = ("train.compile",)) -> None:
    """torch.compile on the CPU generates C++: where one of `keys` (train.compile, eval.compile) asks for it,
    a C++ compiler must be on PATH (the GPU path needs none here)."""
    import shutil

    if getattr(device, "type", str(device)) != "cpu" or any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return
    for key in keys:
        section, name = key.split(".")
        if getattr(getattr(spec, section), name):
            raise SpecError("torch.compile on the CPU needs a C++ compiler (g++, c++ or clang++) on PATH and none "
                            f"was found; install one or set {key} = false", key=key)


def memory_estimate(params: int, batch_size: int, gmacs: float | None) -> int:
    """A lower bound of the bytes one training process needs: float32 weights, gradients, two AdamW
    moments and the EMA copy (20 bytes a parameter), plus activations of the order of the forward's
    multiply-accumulates per image (one float32 per MAC/1000 is a conservative floor)."""
    activations = 4 * batch_size * (gmacs or 0.0) * 1e9 / 1000
    return int(20 * params + activations)


def available_memory() -> int | None:
    """Bytes this machine can give a new process now (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
