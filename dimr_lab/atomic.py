"""Atomic file writes: write a temporary file beside the target, fsync, rename, fsync the folder. A reader
(or a run killed mid-write) sees the old file or the new one, never half of one, and once the call returns
the rename itself survives a power loss (the folder's entry is on disk, not only the file's bytes). Files get
the permissions the umask gives (a group can read a shared results folder), not the 0600 of a temporary file;
a killed write's temporary file (`.NAME.*.tmp`) is removed by the next writer of its folder
(rundir.remove_stale_temporaries)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename, a new name, a link made in it) to disk. Best effort: a file system
    that does not open or fsync folders (some network and FUSE mounts) keeps whatever guarantee it gives."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dirs(folder: str | Path) -> None:
    """mkdir -p, and fsync the parent of each folder it creates, so that the new folders outlive a power loss
    along with what is then written into them (nothing to flush when the folder exists)."""
    folder = Path(folder)
    missing = []
    here = folder
    while not here.is_dir():
        missing.append(here)
        if here.parent == here:
            break
        here = here.parent
    if not missing:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):  # top down: a parent's entry before its child's
        fsync_dir(created.parent)


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], *, binary: bool = True) -> None:
    """Call write(f) on a temporary file beside `path`, then rename it onto `path` and flush the rename."""
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)
