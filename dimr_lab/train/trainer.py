"""One run: train (resumable, DDP-aware, continuable to more steps), then evaluate the steps it asks for.

    train_run(spec, out_dir)     # the same call again resumes; with a larger train.steps it continues

The run folder's layout is dimr_lab.rundir's. Before anything is written the spec is checked against
the filesystem and the machine (files, memory); then, under the folder's lock, the folder is claimed:
a folder holding another run (another identity) is refused, never overwritten. Every step's diffusion
maths comes from dimr_lab.diffusion.training; evaluations from dimr_lab.eval.run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np
import torch

from dimr_lab import dist as distributed
from dimr_lab.atomic import make_dirs
from dimr_lab.errors import UserError
from dimr_lab.nn.checkpoint import read_checkpoint, write_checkpoint
from dimr_lab.rundir import (CheckpointIndex, RunDir, RunRecord, SessionLog, remove_stale_temporaries, run_lock)
from dimr_lab.spec.schema import to_dict
from dimr_lab.train.loop import (EMA, BatchOrder, batch_iterator, build_optimizer, ema_decay_at,
                                 get_rng_state, learning_rate, set_rng_state)

# forward + backward of a training step costs about 3x the forward multiply-accumulates
TRAIN_MACS_PER_FORWARD = 3.0
# the dataset (and its evaluation classifier) is the same whatever train.seed: seeds vary the training only
DATA_SEED = 0
# with several processes, how often (in steps) the ranks agree on a stop request or the time limit
STOP_CHECK_EVERY = 10


def train_run(spec: Any, out_dir: Path, *, should_stop: Callable[[], bool] | None = None, progress: bool = True,
              record: RunRecord | None = None, evaluate: bool = True, resample: bool = False) -> dict[str, Any]:
    """Train what is left of the run in out_dir, then evaluate spec.eval_steps(); the last step's metrics.
    `resample`: the evaluations sample anew rather than take a finished sibling evaluation's samples
    (dimr_lab.eval.reuse; `dimr-lab run --resample`).

    Returns {"interrupted": True, "step": s} when should_stop() or train.time_limit_s stopped it (after
    a checkpoint, or between an evaluation's chunks: then with "evaluating": the step evaluated; with
    "time_limit": True when the time limit did), {"rank": r} on ranks other than 0, else the metrics of the
    last step's evaluation."""
    from dimr_lab.spec.preflight import check_out_dir

    run = RunDir(check_out_dir(out_dir))
    made_folder = not run.path.exists() and int(os.environ.get("RANK", "0") or 0) == 0
    try:
        return _train_run(spec, run, should_stop=should_stop, progress=progress, record=record, evaluate=evaluate,
                          resample=resample)
    except BaseException:
        if made_folder:
            _remove_if_only_lock(run.path)
        raise


def _remove_if_only_lock(folder: Path) -> None:
    """A folder this call made and left with nothing but its lock (a refusal or failure before the first
    record): removed, so that a refused command leaves no trace."""
    from dimr_lab.rundir import LOCK

    with contextlib.suppress(OSError):
        if {p.name for p in folder.iterdir()} <= {LOCK}:
            (folder / LOCK).unlink(missing_ok=True)
            folder.rmdir()


def _train_run(spec: Any, run: RunDir, *, should_stop: Callable[[], bool] | None, progress: bool,
               record: RunRecord | None, evaluate: bool, resample: bool = False) -> dict[str, Any]:
    from dimr_lab.spec.preflight import check_files

    from dimr_lab.train.tracking import check_available

    check_files(spec, samples=evaluate)
    if evaluate:  # a damaged weights file is found before training, not after it
        from dimr_lab.eval.extractors import check_inception_weights

        check_inception_weights(spec.eval)
    check_available(spec.track)
    info = distributed.setup()
    try:
        from dimr_lab.spec.preflight import check_compiler, check_processes

        check_processes(spec, info.world_size)
        # evaluations follow training in this call: a missing compiler for either is found before step 0
        check_compiler(spec, info.device, keys=("train.compile", "eval.compile") if evaluate else ("train.compile",))
        check_memory(spec, info)
        with run_lock(run.path) if info.main else contextlib.nullcontext():
            if info.main:
                blocked = run.outputs_without_checkpoint(spec.first_checkpoint_step())
                if blocked:
                    raise UserError(blocked)
                commit = claim(run, spec, record)
            else:
                commit = None
            distributed.barrier(info)
            trainer = Trainer(spec, run, info, should_stop, progress, on_start=commit, evaluate=evaluate,
                              resample=resample)
            outcome = "failed"
            try:
                stopped = trainer.fit()
                if stopped is not None:
                    outcome = trainer.stop_reason
                    return {**stopped, "time_limit": True} if outcome == "time_limit" else stopped
                if not evaluate:
                    outcome = "done"
                    return {"rank": info.rank} if not info.main else {"step": trainer.step}
                result = trainer.evaluate_all()
                outcome = trainer.stop_reason if result.get("interrupted") else "done"
                return {**result, "time_limit": True} if outcome == "time_limit" else result
            finally:
                trainer.session.end(outcome, trainer.step)
                trainer.tracker.close()
    finally:
        distributed.cleanup(info)


def check_memory(spec: Any, info: distributed.DistInfo) -> None:
    """Refuse, with the figure, a network and batch that cannot fit the device (before any allocation)."""
    from dimr_lab.nn.describe import counts_for
    from dimr_lab.spec.preflight import available_memory, memory_estimate

    c = counts_for(spec.model) or {}
    need = memory_estimate(int(c.get("params") or 0), spec.train.batch_size // info.world_size, c.get("gmacs"))
    if info.device.type == "cuda":
        have, _ = torch.cuda.mem_get_info(info.device)
        where = f"GPU {info.device}"
    else:
        have, where = available_memory(), "this machine"
    if have is not None and need > have:
        raise UserError(f"the network ({(c.get('params') or 0) / 1e6:.1f}M parameters) and a batch of "
                        f"{spec.train.batch_size // info.world_size} need at least {need / 2**30:.1f} GiB to train; "
                        f"{where} has {have / 2**30:.1f} GiB available (model.*, train.batch_size)")


def claim(run: RunDir, spec: Any, record: RunRecord | None) -> Callable[[], None]:
    """Make run.path this run's folder (rank 0, under the lock): refuse another run's folder and remove what
    interrupted writes left. Returns what writes spec.json (and run.json for a folder `train` makes, or the
    continued spec into its record), called once the checkpoint has loaded and the step asked for is
    reachable, so that a refused command leaves the records as they were."""
    from dimr_lab.spec.run_spec import load_run_spec

    identity = spec.identity_hash()
    make_dirs(run.path)
    for folder in (run.path, run.checkpoints):
        if folder.exists() and not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"{folder}: not writable; the run could not save its checkpoints")
        remove_stale_temporaries(folder)
    if run.spec_path.exists():
        try:
            held = load_run_spec(run.read_spec_document(), file=str(run.spec_path))
        except UserError:
            raise UserError(f"{run.spec_path}: not a dimr-lab spec file this version reads; refusing to overwrite "
                            f"it (use another --out)") from None
        if held.identity_hash() != identity:
            raise UserError(f"{run.path}: holds another run ({_identity_diff(held, spec)}); refusing to overwrite "
                            f"it: use another --out")
    idx = run.index()
    if idx is not None and idx.identity != identity:
        raise UserError(f"{run.index_path}: the checkpoints belong to another run (identity {idx.identity}, this "
                        f"run is {identity}); refusing to use them")
    held_record = None
    if run.record_path.exists():
        held_record = run.read_record()
        if held_record.identity != identity:
            raise UserError(f"{run.record_path}: this folder was planned for another run (identity "
                            f"{held_record.identity}, this one is {identity})")

    def commit() -> None:
        if held_record is None:
            run.write_record(record or RunRecord(spec=to_dict(spec), identity=identity, variant=run.path.name,
                                                 seed=spec.train.seed, executor="train", created=time.time()))
        elif record is None and held_record.spec != to_dict(spec):
            # `train` continuing a run (a larger train.steps, or a setting outside the identity): the record
            # says what the folder now holds, so `status` and the runner read the spec being trained
            run.write_record(dataclasses.replace(held_record, spec=to_dict(spec)))
        run.write_spec_document(to_dict(spec), identity)

    return commit


def _identity_diff(held: Any, mine: Any) -> str:
    """'differs in train.lr, model.norm' (and why train.steps matters where it does)."""
    a, b = held.identity(), mine.identity()
    keys = sorted(_diff(a, b))
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    why = ""
    if keys == ["train.steps"]:
        why = (f"; train.steps is part of its identity because train.lr_schedule = "
               f"{mine.train.lr_schedule!r} depends on the total: a longer run is another run")
    return f"differs in {shown}{why}"


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix or "(top level)"]


class Trainer:
    """The state of one train_run (one object, so the steps read top to bottom)."""

    def __init__(self, spec: Any, run: RunDir, info: distributed.DistInfo,
                 should_stop: Callable[[], bool] | None, progress: bool, on_start: Callable[[], None] | None = None,
                 evaluate: bool = True, resample: bool = False):
        self.spec, self.run, self.info = spec, run, info
        self.evaluate, self.resample = evaluate, resample
        self.session = SessionLog(run, say=self._say)  # written by rank 0 only: begin() is called there alone
        self.on_start = on_start
        self.rank, self.world, self.device = info.rank, info.world_size, info.device
        self.should_stop, self.progress = should_stop, progress and info.main
        self.identity = spec.identity_hash()
        self.t0, self.started = time.perf_counter(), time.time()
        self.kept = set(spec.kept_steps())
        self.step, self.elapsed_before = 0, 0.0
        self.last_loss: float | None = None
        self.session_steps = 0
        self.stop_reason = "stopped"  # or "time_limit": the outcome of a session stopped early
        # the log's averaging window (sums of the step losses, made in build(); steps) since the last row:
        # checkpointed, so that a resumed run writes the rows an uninterrupted one writes
        self.win_loss: torch.Tensor | None = None
        self.win_steps = 0
        from dimr_lab.train.threads import ThreadGovernor
        from dimr_lab.train.tracking import Tracker

        self.threads = ThreadGovernor(spec.train.threads, enabled=info.device.type == "cpu")
        record = None
        if info.main and run.record_path.exists():
            with contextlib.suppress(UserError):
                record = run.read_record()
        self.tracker = Tracker(spec, run.path, record, enabled=info.main)

    # ------------------------------------------------------------------------------------------ build

    def build(self) -> None:
        from dimr_lab.data import build_dataset
        from dimr_lab.diffusion.schedule import build_schedule
        from dimr_lab.diffusion.training import loss_weights
        from dimr_lab.nn.network import build_model
        from dimr_lab.registry import DATASETS

        spec, tr = self.spec, self.spec.train
        # seed everything a step might touch; the draws that matter come from self.noise
        torch.manual_seed(tr.seed)
        np.random.seed(tr.seed % 2**32)
        random.seed(tr.seed)
        # the trainer flips pixel images itself (from its own generator: the same on every rank, checkpointed);
        # latents datasets hold their flips baked in
        self.dataset = build_dataset(dataclasses.replace(spec.data, flip=False), split="train", seed=DATA_SEED)
        self.flip = bool(spec.data.flip) and DATASETS.meta(spec.data.name, "kind") == "pixels"
        ds_classes = int(getattr(self.dataset, "num_classes", 0))
        if ds_classes > spec.model.num_classes:
            raise UserError(f"the dataset has {ds_classes} classes but model.num_classes is {spec.model.num_classes}")
        channels = int(getattr(self.dataset, "channels", spec.model.in_channels))
        if channels != spec.model.in_channels:
            raise UserError(f"the data has {channels} channels but model.in_channels is {spec.model.in_channels}")
        # A run that resumes takes every parameter and buffer, and every generator's state, from a checkpoint (or
        # stops: resume() loads one or refuses), so by-name draws would be thrown away (they double the build's
        # time: 5.6 s against 2.6 s for M/3R on a CPU core): it is built as "stream" builds, which leaves the
        # global generator where by_name's construction does (its draws come from generators of their own)
        draws = "stream" if tr.init_draws == "by_name" and self._checkpoints() else tr.init_draws
        self.model = build_model(spec.model, init_draws=draws, seed=tr.seed).to(self.device)
        self.null_label = int(self.model.null_label)
        if tr.activation_checkpointing:
            self.model.set_checkpointing(True)
        self.ema = copy.deepcopy(self.model).float().eval().requires_grad_(False)  # fp32 EMA copy
        self.ema_step = EMA(self.ema, self.model)
        self.optimizer = build_optimizer(self.model, lr=tr.lr, betas=tuple(tr.betas), weight_decay=tr.weight_decay,
                                         no_decay=tr.no_decay)
        cuda = self.device.type == "cuda"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tr.precision) if cuda else None
        self.scaler = torch.amp.GradScaler("cuda") if cuda and tr.precision == "fp16" else None
        self.schedule = build_schedule(spec.diffusion)
        self.weights = loss_weights(spec.diffusion, len(spec.model.branches))
        self.win_loss = torch.zeros(1 + len(self.weights), dtype=torch.float64, device=self.device)
        self.noise = torch.Generator().manual_seed(tr.seed)  # CPU: the same numbers on any device
        self.order = BatchOrder(len(self.dataset), tr.batch_size, tr.seed)
        self.fwd = self.model
        if tr.compile:
            self.model.compile_blocks()  # regional: one graph per kind of block (DDP wraps the network itself)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.fwd = DDP(self.model, device_ids=[self.device.index] if cuda else None)

    # ----------------------------------------------------------------------------------------- resume

    def _checkpoints(self) -> list[Path]:
        """The checkpoints a resume tries, in order: last.pt, then the kept ones, newest first."""
        run = self.run
        candidates = [run.last_checkpoint] if run.last_checkpoint.exists() else []
        idx = run.index()
        # the index's kept steps and the files on disk: a damaged index.json must not hide a good kept file
        kept = sorted(set(idx.kept if idx else []) | set(run.kept_on_disk()), reverse=True)
        return candidates + [run.kept_checkpoint(s) for s in kept if run.kept_checkpoint(s).exists()]

    def resume(self) -> bool:
        """Load the newest usable checkpoint; a damaged last.pt falls back to the newest kept one (warning).
        With a checkpoint there, one loads or this raises: build() relies on it (no by-name draws then)."""
        candidates = self._checkpoints()
        if not candidates:
            return False
        first_error = None
        for path in candidates:
            try:
                self._load(path)
            except UserError as err:
                first_error = first_error or err
                continue
            if path != candidates[0] and self.info.main:  # one warning per job, not one per process
                print(f"warning: {first_error}; resuming from the kept checkpoint {path.name} (step {self.step})",
                      file=sys.stderr)
            if self.info.main:
                self._settle_checkpoints(path)
            return True
        raise first_error  # type: ignore[misc]

    def _load(self, path: Path) -> None:
        ckpt = read_checkpoint(path, identity=self.identity, model_spec=to_dict(self.spec.model), training=True)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.ema.load_state_dict(ckpt["ema"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"], self.noise)
            pos = ckpt["data_position"]
            epoch, index = int(pos["epoch"]), int(pos["index"])
            if epoch < 0 or not 0 <= index <= len(self.dataset):
                # a position past the data read a batch of another run, one before it none (a failure mid-run)
                raise ValueError(f"data position {pos} is outside a dataset of {len(self.dataset)} items")
            order = BatchOrder(len(self.dataset), self.spec.train.batch_size, self.spec.train.seed, epoch, index)
            step = int(ckpt["step"])
            elapsed = float(ckpt.get("elapsed_s", 0.0))
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as err:
            raise UserError(f"{path}: checkpoint does not match this run ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else ''}); delete it to start over") from None
        self.order, self.step = order, step
        self.elapsed_before = elapsed
        window = ckpt.get("log_window")  # absent from checkpoints of earlier versions: the window starts empty
        if isinstance(window, dict) and isinstance(window.get("steps"), int) and window["steps"] > 0 \
                and isinstance(window.get("loss"), list) and len(window["loss"]) == self.win_loss.numel() \
                and all(isinstance(v, float) for v in window["loss"]):
            self.win_loss.copy_(torch.tensor(window["loss"], dtype=torch.float64))
            self.win_steps = window["steps"]

    # ------------------------------------------------------------------------------------------ train

    def fit(self) -> dict[str, Any] | None:
        """Train to train.steps; None when done, {"interrupted": True, "step"} when stopped early."""
        target = self.spec.train.steps
        self.build()
        resumed = self.resume()
        if self.step > target:
            if self.run.checkpoint_for(target) is None:
                raise UserError(f"{self.run.path}: trained to step {self.step} already; step {target} was not kept "
                                f"(kept: {', '.join(map(str, self.run.available_steps())) or 'none'})")
            return None  # a kept step of a longer run: evaluated, nothing trained; the records keep the longer run
        if self.on_start is not None:
            self.on_start()
        if self.info.main:
            # a fresh start: RunSpec.notes' advice, once, beside the progress display
            if self.progress and not resumed and self.step < target:
                for note in self.spec.notes():
                    self._say(f"note: {note}")
            if self._work_left():
                self.session.begin(step=self.step, resumed=resumed, processes=self.world, started=self.started)
            self.tracker.resume_at(self.step if resumed else 0)
            self._trim_log(self.step if resumed else 0)
        if self.step == target:
            if not resumed:
                self.save_checkpoint()  # train.steps = 0: the initial network, for evaluation
            return None
        return self._train()

    def _work_left(self) -> bool:
        """Whether this call trains or evaluates anything (a call on a finished run is no session of it)."""
        return self.step < self.spec.train.steps or (self.evaluate and bool(self.run.unfinished_evaluations(self.spec)))

    def _train(self) -> dict[str, Any] | None:
        from dimr_lab.diffusion.training import draw, training_loss

        tr = self.spec.train
        B, per = tr.batch_size, tr.batch_size // self.world
        lo, hi = self.rank * per, (self.rank + 1) * per
        # read under a forked RNG: a latents item draws its posterior sample from the global one, and a draw at
        # each session's start made a resumed run end elsewhere than an uninterrupted one
        with torch.random.fork_rng(devices=[]):
            x_shape = tuple(self.dataset[0][0].shape)  # (C, H, W)
        batches = batch_iterator(self.dataset, self.order, self.rank, self.world, self.spec.data.num_workers)
        gmacs = self._gmacs()
        self.session_t0 = time.perf_counter()
        win_t, win_loss = time.perf_counter(), self.win_loss
        bar = self._progress_bar()
        self.fwd.train()
        try:
            while self.step < tr.steps:
                if self._stop_requested():
                    self.save_checkpoint()
                    return {"interrupted": True, "step": self.step}
                self.threads.tick()
                self.order.next()  # the position the checkpoint records (the iterator reads the same batch)
                x0, y = next(batches)  # (b, C, H, W), (b,)
                draws = draw(self.schedule, B, x_shape, label_drop=self.spec.diffusion.label_drop, flip=self.flip,
                             generator=self.noise).slice(lo, hi)
                x0, y = x0.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                self._set_lr()
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss, per_branch = training_loss(self.fwd, self.schedule, self.spec.diffusion.time_input, x0, y,
                                                     draws, self.weights, self.null_label)
                self._update(loss)
                self.step += 1
                self.session_steps += 1
                self.win_steps += 1
                win_loss += torch.stack([loss.detach(), *[p.detach() for p in per_branch]]).double()  # no sync
                if self.step % tr.log_every == 0 or self.step == tr.steps or self.step == 1:
                    now = time.perf_counter()
                    # images/s over this session's part of the window (a resumed window began before it)
                    self._log(win_loss / self.win_steps,
                              B * min(self.win_steps, self.session_steps) / (now - win_t), gmacs)
                    win_t, self.win_steps = now, 0
                    win_loss.zero_()
                if bar is not None:
                    bar[0].update(bar[1], completed=self.step, loss=self._loss_text())
                if self.step % tr.checkpoint_every == 0 or self.step == tr.steps or self.step in self.kept:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar[0].stop()
        self.train_images_per_s = B * self.session_steps / max(1e-9, time.perf_counter() - self.session_t0)
        return None

    def _set_lr(self) -> None:
        lr = learning_rate(self.step, self.spec.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _update(self, loss: torch.Tensor) -> None:
        """Backward, clip, optimizer step, EMA."""
        tr = self.spec.train
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if tr.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), tr.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if tr.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), tr.grad_clip)
            self.optimizer.step()
        self.ema_step.update(ema_decay_at(self.step, tr.ema_decay, tr.ema_warmup))

    def _stop_requested(self) -> bool:
        """should_stop() or the time limit, agreed over all ranks: with several processes every
        STOP_CHECK_EVERY steps of this session only, since agreeing reads a value back from the device
        (a host sync) and every rank must ask at the same steps."""
        if self.world > 1 and self.session_steps % STOP_CHECK_EVERY:
            return False
        return distributed.any_flag(self.info, self._stop_or_time_limit())

    def _stop_or_time_limit(self) -> bool:
        """should_stop() or train.time_limit_s passed (this process's view; callers agree over the ranks)."""
        if self.should_stop is not None and self.should_stop():
            return True
        limit = self.spec.train.time_limit_s
        if limit > 0 and time.perf_counter() - self.t0 > limit:
            self.stop_reason = "time_limit"  # what sessions.json says ended the session
            return True
        return False

    def _gmacs(self) -> float | None:
        from dimr_lab.nn.describe import counts_for

        try:
            self._counts = counts_for(self.spec.model) or {}
        except Exception:  # informative only: never fails a run
            self._counts = {}
        return self._counts.get("gmacs")

    # ------------------------------------------------------------------------------------------ files

    def save_checkpoint(self) -> None:
        """Rank 0 writes checkpoints/last.pt atomically, links a kept step, then updates the index."""
        window = None
        if self.win_steps:
            sums = self.win_loss.clone()
            if self.world > 1:  # every rank calls this: the window's mean over ranks, as _log takes it
                torch.distributed.all_reduce(sums)
                sums = sums / self.world
            window = {"loss": [float(v) for v in sums.cpu()], "steps": self.win_steps}
            self._check_finite(window["loss"][0], "before its checkpoint")
        self._check_finite_weights()
        if self.info.main:
            run = self.run
            write_checkpoint(run.last_checkpoint, {
                "model_spec": to_dict(self.spec.model), "identity": self.identity,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": self.step, "rng": get_rng_state(self.noise), "data_position": self.order.state(),
                "elapsed_s": self.elapsed_before + time.perf_counter() - self.t0, "world_size": self.world,
                "log_window": window,
            })
            idx = run.index()
            kept = set(idx.kept) if idx else set()
            if self.step in self.kept:
                self._link_kept()
                kept.add(self.step)
            CheckpointIndex(self.step, sorted(s for s in kept if run.kept_checkpoint(s).exists()),
                            self.identity).write(run.index_path)
            self.session.touch(self.step, force=True)
        distributed.barrier(self.info)

    def _settle_checkpoints(self, loaded: Path) -> None:
        """After a kill between writing last.pt, linking its kept copy and updating the index: make the
        index and the kept files agree with the checkpoint the run resumed from."""
        run = self.run
        if loaded == run.last_checkpoint and self.step in self.kept and not run.kept_checkpoint(self.step).exists():
            self._link_kept()
        kept = sorted(s for s in self.kept | set(run.kept_on_disk()) if run.kept_checkpoint(s).exists())
        CheckpointIndex(self.step, kept, self.identity).write(run.index_path)

    def _link_kept(self) -> None:
        run = self.run
        target = run.kept_checkpoint(self.step)
        target.unlink(missing_ok=True)
        try:
            target.hardlink_to(run.last_checkpoint)  # the same bytes, no copy
        except OSError:  # no hard links here: a copy, written whole before it takes the name
            import shutil

            tmp = target.with_name(f".{target.name}.copy.tmp")  # the name remove_stale_temporaries clears
            shutil.copyfile(run.last_checkpoint, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        # the new name is flushed with the index naming it (CheckpointIndex.write fsyncs checkpoints/)

    def _trim_log(self, step: int) -> None:
        """Keep the log rows up to `step` (those after the checkpoint are written again)."""
        from dimr_lab.atomic import atomic_write_text

        if not self.run.log_path.exists():
            return
        rows = [r for r in self.run.log_rows() if isinstance(r.get("step"), int) and r["step"] <= step]
        atomic_write_text(self.run.log_path, "".join(json.dumps(r) + "\n" for r in rows))

    def _loss_text(self) -> str:
        return "-" if self.last_loss is None else f"{self.last_loss:.4f}"

    def _log(self, means: torch.Tensor, images_per_s: float, gmacs: float | None) -> None:
        """Append one row to log.jsonl (rank 0; losses averaged over ranks and the window)."""
        if self.world > 1:
            torch.distributed.all_reduce(means)
            means = means / self.world
        means = means.cpu()
        self.last_loss = float(means[0])
        if self.info.main:
            self._write_row(means, images_per_s, gmacs)
        self._check_finite(self.last_loss, "log.jsonl")  # after the row: the log shows the NaN that stopped it

    def _write_row(self, means: torch.Tensor, images_per_s: float, gmacs: float | None) -> None:
        row = {"step": self.step, "epoch": self.order.epoch, "loss": float(means[0]),
               "loss_branches": [float(v) for v in means[1:]],
               "lr": learning_rate(self.step - 1, self.spec.train),
               "images_per_s": images_per_s, "threads": self.threads.threads,
               "gmacs_per_s": TRAIN_MACS_PER_FORWARD * gmacs * images_per_s if gmacs else None,
               "elapsed_s": self.elapsed_before + time.perf_counter() - self.t0}
        try:
            with open(self.run.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as err:
            raise UserError(f"{self.run.log_path}: cannot append to the log ({err.strerror or err})") from None
        self.session.touch(self.step)
        from dimr_lab.train.tracking import train_row_scalars

        self.tracker.scalars(self.step, train_row_scalars(row))

    def _check_finite(self, mean_loss: float, where: str) -> None:
        """Stop a run whose loss went NaN or inf (with fp16's loss scaling a step may overflow and be
        skipped, so there the check is left to the scaler): no checkpoint of the diverged weights is
        written, the last one stays."""
        if self.scaler is None and not math.isfinite(mean_loss):
            self._diverged(f"the training loss is {mean_loss} by step {self.step} ({where})")

    def _check_finite_weights(self) -> None:
        """Stop before a checkpoint of non-finite weights: an update can make them NaN or inf in the very step
        whose loss (computed before it) was still finite, and the checkpoint would be a run that cannot resume.
        One read back from the device per checkpoint."""
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        if not params or bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            return
        name = next(n for n, p in self.model.named_parameters() if p.is_floating_point()
                    and not bool(torch.isfinite(p).all()))
        self._diverged(f"the weights hold NaN or inf by step {self.step} ({name})")

    def _diverged(self, what: str) -> NoReturn:
        """Stop a diverged run with one line saying which checkpoint stays."""
        idx = self.run.index() if self.info.main else None
        kept = f"the checkpoint of step {idx.last} is kept" if idx else "no checkpoint was written"
        raise UserError(f"{self.run.path}: {what}; {kept}: lower train.lr, set train.grad_clip, or check the data "
                        f"for NaN")

    def _progress_bar(self) -> Any:
        """(rich Progress, task id) on rank 0 when asked, else None."""
        if not self.progress:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                       TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        task = bar.add_task("train", total=self.spec.train.steps, completed=self.step, loss=self._loss_text())
        bar.start()
        return bar, task

    # --------------------------------------------------------------------------------------- evaluate

    def evaluate_all(self) -> dict[str, Any]:
        """Evaluate every step the spec asks for (done ones are skipped); the last step's metrics."""
        from dimr_lab.eval.run import evaluate_step, train_summary
        from dimr_lab.images import write_figure

        if self.info.main:
            plot_loss(self.run.log_rows(), self.run.path / "loss.png", write_figure)
        self.model.eval()
        del self.optimizer  # sampling needs the memory more
        metrics: dict[str, Any] = {}
        for step in self.spec.eval_steps():
            if self.run.checkpoint_for(step) is None:
                raise UserError(f"{self.run.path}: no checkpoint at step {step} to evaluate")
            made = self.run.find_evaluation(step, self.spec.eval_hash())
            done = made is not None and made.serves(self.spec.eval.enabled)
            bar = None if done else self._phase_bar(f"sampling (step {step})")  # no empty bar for one made before
            try:
                # bounded by train.time_limit_s too: stopped between chunks, it resumes at the first missing one
                res = evaluate_step(self.spec, self.run, step, info=self.info, should_stop=self._stop_or_time_limit,
                                    log=self._say if self.progress else None,
                                    progress=(lambda done, total: bar[0].update(bar[1], completed=done, total=total))
                                    if bar else None, train_info=train_summary(self.run, step, self.spec),
                                    resample=self.resample)
            finally:
                if bar is not None:
                    bar[0].stop()
            if res is None:
                return {"interrupted": True, "step": self.step, "evaluating": step}
            if self.info.main:
                self.session.touch(self.step, force=True)
            if self.info.main and "rank" not in res and not done:  # one made before was tracked when made
                from dimr_lab.train.tracking import eval_scalars

                self.tracker.scalars(step, eval_scalars(res))
                self.tracker.image(step, "eval/samples", Path(self.run.eval_dir(step, self.spec.eval_hash())) /
                                   "samples.png")
            metrics = res
        return metrics

    def _phase_bar(self, name: str) -> Any:
        """A progress bar for a phase after training (rank 0, when asked)."""
        if not self.progress:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn(name), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        task = bar.add_task(name, total=None)
        bar.start()
        return bar, task

    def _say(self, line: str) -> None:
        print(f"[dimr-lab] {line}", file=sys.stderr, flush=True)


def plot_loss(rows: list[dict[str, Any]], png: Path, write_figure: Callable) -> None:
    """Loss (total and per branch) against step, as a PNG; markers where the log has few rows."""
    rows = [r for r in rows if isinstance(r.get("step"), int) and isinstance(r.get("loss"), (int, float))]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    style = {"marker": "o", "markersize": 3} if len(rows) < 20 else {}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], label="total", color="black", **style)
    for k in range(len(rows[0].get("loss_branches") or [])):
        ax.plot(steps, [(r.get("loss_branches") or [None] * (k + 1))[k] for r in rows], label=f"branch {k}",
                alpha=0.7, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_figure(fig, png)
