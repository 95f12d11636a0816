"""Reuse a trained run of the same identity from elsewhere in the results folder.

A run's identity hashes what it trains (model, data, diffusion, recipe, seed), so two ablations that share
a row (Table 2's multi-branch adaLN-Zero row is the norm ablation's adaLN-Zero variant) plan folders with the
same identity under different ablations. Training it twice gives bit-identical weights on the CPU; instead
the runner copies the trained folder (checkpoints, log, evaluations) into the new place and records where
it came from (`reused_from` in run.json). What the new run asks for beyond the copy (more steps, other
evaluation settings) is then trained or evaluated as for any resumed run.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dimr_lab.atomic import fsync_dir
from dimr_lab.rundir import (CHECKPOINTS, EVALS, LOG, LOSS_PLOT, SESSIONS, SPEC, RunBusy, RunDir, is_run_folder,
                             pid_alive, run_lock, try_read_json_object)

# what a copy takes: the trained state, its evaluations and the sessions that made them (their restarts and
# wall time); not the runner's own files (run.json is planned anew, local.json/slurm.json/output.log belong to
# the processes that trained the source, .lock to nobody)
COPIED = (SPEC, LOG, LOSS_PLOT, CHECKPOINTS, EVALS, SESSIONS)


@dataclass
class Source:
    path: Path
    step: int        # the source's last checkpoint


def find_source(results: Path, run_dir: Path, identity: str, steps: int, evaluates: Sequence[int] = ()
                ) -> Source | None:
    """The trained folder under `results/<ablation>/` with this identity, not `run_dir`, whose last checkpoint
    is at most `steps` (more is not reused: its last checkpoint would be past the planned end) and that holds a
    checkpoint at each step of `evaluates` it trained past (the run evaluates them; one the source did not keep
    could never be evaluated in the copy, where training here keeps it); the furthest trained one wins, then
    the name."""
    best: Source | None = None
    try:
        ablations = sorted(p for p in Path(results).iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return None
    for ablation in ablations:
        for cand in sorted(ablation.glob(f"*-{identity}")):
            if cand.resolve() == Path(run_dir).resolve() or not is_run_folder(cand):
                continue
            folder = RunDir(cand)
            index = folder.index()
            if index is None or index.identity != identity or not folder.last_checkpoint.is_file():
                continue
            doc = try_read_json_object(folder.spec_path)  # a damaged source is simply not reused
            if doc is None or doc.get("identity") != identity:
                continue
            if any(s <= index.last and folder.checkpoint_for(s) is None for s in evaluates):
                continue
            if 0 < index.last <= steps and (best is None or index.last > best.step):
                best = Source(cand, index.last)
    return best


def _copy_file(src: Path, dst: Path) -> None:
    """Checkpoints as hard links where the file system allows (they are never rewritten in place: saves
    replace them by rename); every other file as a copy (the log is appended to in place, so a link would
    let the two runs write into each other's log). A copy is flushed to disk before the folder holding it is
    renamed into place, so that a power loss after the rename cannot leave a reused run with empty files."""
    if Path(src).suffix == ".pt":
        with contextlib.suppress(OSError):
            os.link(src, dst)
            return
    shutil.copy2(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def _flush_folders(top: Path) -> None:
    """fsync every folder of a copied tree (the names in them), children before the rename that publishes them."""
    for here, _dirs, _files in os.walk(top):
        fsync_dir(here)


def _remove_dead_copies(run_dir: Path) -> None:
    """Hidden copies of earlier reuses of run_dir whose process is gone (killed between the copy and the
    rename): nothing else would ever remove them. A copy of a live process is left to it."""
    for old in run_dir.parent.glob(f".{run_dir.name}.reuse-*"):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)) and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


def reuse(results: Path, run_dir: Path, identity: str, steps: int, evaluates: Sequence[int] = ()) -> Source | None:
    """Copy a trained folder of this identity into `run_dir` when `run_dir` holds no trained state yet.

    The copy is made in a hidden sibling folder under the source's lock (a source being trained right now
    is skipped), then renamed into place: a new `run_dir` holds the whole copy or nothing of it; into a
    folder planned before (run.json only) the parts move one by one under its lock (a folder another process
    holds is skipped), checkpoints first, so a kill between them leaves a folder that resumes from those
    checkpoints."""
    run_dir = Path(run_dir)
    if RunDir(run_dir).index() is not None or (run_dir / SPEC).exists():
        return None
    source = find_source(results, run_dir, identity, steps, evaluates)
    if source is None:
        return None
    _remove_dead_copies(run_dir)
    tmp = run_dir.parent / f".{run_dir.name}.reuse-{os.getpid()}"
    try:
        with run_lock(source.path, purpose="reuse"):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name in COPIED:
                src = source.path / name
                if src.is_dir():
                    shutil.copytree(src, tmp / name, copy_function=_copy_file,
                                    ignore=shutil.ignore_patterns("chunks", ".*.tmp"))
                elif src.is_file():
                    _copy_file(src, tmp / name)
            _flush_folders(tmp)
        if run_dir.exists():  # planned before (run.json, a lock file): move the copy in beside them, under
            # its lock (a trainer holding it, one that found no checkpoint, owns what the folder gets)
            with run_lock(run_dir, purpose="reuse"):
                if any(p.name in COPIED for p in run_dir.iterdir()):
                    return None
                for name in COPIED:  # checkpoints first: a folder with weights and no spec.json resumes from them
                    if (tmp / name).exists():
                        os.rename(tmp / name, run_dir / name)
                fsync_dir(run_dir)
        else:
            os.rename(tmp, run_dir)
            fsync_dir(run_dir.parent)
        return source
    except RunBusy:
        return None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)


def reuse_runs(runs: list, results: Path, executor: str) -> list[tuple[object, Source]]:
    """Fill each unfinished planned run with nothing trained yet from a trained folder of its identity
    elsewhere under `results`; writes run.json of each filled run (with `reused_from`)."""
    from dimr_lab.runner.local import write_record

    filled = []
    for r in runs:
        if r.is_done():
            continue
        source = reuse(results, r.run_dir, r.identity, r.spec.train.steps, r.spec.eval_steps())
        if source is None:
            continue
        r.reused_from = str(source.path.relative_to(Path(results)))
        write_record(r, executor)
        filled.append((r, source))
    return filled
