"""One run: train (resumable, DDP-aware), then a sample grid, evaluation and metrics.json.

Run directory:
    spec.json            the resolved spec (refuses a different one)
    checkpoints/last.pt  model, EMA, optimizer, step, every RNG state, data position (atomic)
    log.jsonl            one line every train.log_every steps
    loss.png, samples.png
    metrics.json         written last (atomic): its presence means the run is done
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dimr_lab.errors import UserError
from dimr_lab.spec.schema import to_dict
from dimr_lab.atomic import atomic_save, atomic_write_text
from dimr_lab.train.checkpoint import FORMAT, get_rng_state, load_checkpoint, set_rng_state
from dimr_lab.train.loop import BatchOrder, batch_iterator, build_optimizer, ema_update, lr_at
from dimr_lab.train.runinfo import check_spec_file, git_commit, spec_document, versions

# forward + backward of a training step costs about 3x the forward multiply-accumulates
TRAIN_MACS_PER_FORWARD = 3.0
# the dataset (and its evaluation classifier) is the same whatever train.seed: seeds vary the training only
DATA_SEED = 0


def cache_dir() -> Path:
    """Where trained evaluation classifiers are cached: $DIMR_LAB_CACHE or ~/.cache/dimr-lab."""
    return Path(os.environ.get("DIMR_LAB_CACHE") or Path.home() / ".cache" / "dimr-lab")


def train_run(spec: Any, out_dir: Path, *, should_stop: Callable[[], bool] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Train, sample and evaluate one run in out_dir (resuming it if started); the metrics dict.

    Returns {"interrupted": True, "step": s} when should_stop() or train.time_limit_s stopped it (after
    a checkpoint), {"rank": r} on ranks other than 0, else the metrics written to metrics.json.
    """
    from dimr_lab.train.distributed import cleanup_distributed, setup_distributed

    out_dir = Path(out_dir)
    dist = setup_distributed()
    try:
        run = _Run(spec, out_dir, dist, should_stop, progress)
        result = run.run()
    finally:
        cleanup_distributed(dist)  # before sampling: the other ranks are done
    return result if result is not None else run.finish()


class _Run:
    """State of one train_run call (kept in one object so the steps read top to bottom)."""

    def __init__(self, spec: Any, out_dir: Path, dist: Any, should_stop: Callable[[], bool] | None,
                 progress: bool):
        self.spec, self.out_dir, self.dist = spec, out_dir, dist
        self.rank, self.world, self.device = dist.rank, dist.world_size, dist.device
        self.should_stop, self.progress = should_stop, progress and dist.rank == 0
        self.t0 = time.perf_counter()
        self.ckpt_path = out_dir / "checkpoints" / "last.pt"
        self.log_path = out_dir / "log.jsonl"

    # ---------------------------------------------------------------- top level

    def run(self) -> dict[str, Any] | None:
        """Train what is left; the result dict, or None when rank 0 should go on to finish()."""
        spec, out_dir = self.spec, self.out_dir
        resolved = to_dict(spec)
        check_spec_file(out_dir, resolved)  # every rank checks, so every rank raises alike
        if (out_dir / "metrics.json").is_file():
            return json.loads((out_dir / "metrics.json").read_text())  # done: nothing to redo
        if self.world > 1 and spec.train.batch_size % self.world:
            raise UserError(f"train.batch_size {spec.train.batch_size} does not divide over {self.world} processes")
        if self.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out_dir / "spec.json", json.dumps(spec_document(resolved), indent=2) + "\n")
        self._barrier()
        self._build()
        resumed = self._resume()
        if self.rank == 0:
            self._trim_log(self.step if resumed else 0)
        stopped = self._train()
        if stopped:
            return {"interrupted": True, "step": self.step}
        if self.rank != 0:
            return {"rank": self.rank}
        return None

    # ---------------------------------------------------------------- setup

    def _build(self) -> None:
        from dimr_lab.data import build_dataset
        from dimr_lab.diffusion.loss import default_loss_weights
        from dimr_lab.diffusion.schedule import build_schedule
        from dimr_lab.nn.network import build_model

        spec, tr = self.spec, self.spec.train
        # seed everything a step might touch; the draws that matter come from self.noise below
        torch.manual_seed(tr.seed)
        np.random.seed(tr.seed)
        random.seed(tr.seed)
        # the trainer flips pixel images itself from its own generator (same on every rank, checkpointed);
        # latents datasets hold their flips baked in
        data_spec = dataclasses.replace(spec.data, flip=False)
        self.dataset = build_dataset(data_spec, split="train", seed=DATA_SEED)
        self.flip = bool(spec.data.flip) and getattr(self.dataset, "kind", "pixels") == "pixels"
        self.model = build_model(spec.model).to(self.device)
        mspec = self.model.spec
        self.num_classes = int(mspec.num_classes)
        self.null_label = int(getattr(self.model, "null_label", self.num_classes))
        if getattr(self.dataset, "num_classes", self.num_classes) > self.num_classes:
            raise UserError(f"the dataset has {self.dataset.num_classes} classes but model.num_classes is "
                            f"{self.num_classes}")
        # samples are drawn for the dataset's classes (a network may have more label rows than it uses)
        self.data_classes = int(getattr(self.dataset, "num_classes", self.num_classes))
        if tr.activation_checkpointing:
            self.model.set_checkpointing(True)
        self.ema = copy.deepcopy(self.model).float().eval().requires_grad_(False)  # fp32 EMA copy
        self.optimizer = build_optimizer(self.model, lr=tr.lr, betas=tuple(tr.betas), weight_decay=tr.weight_decay,
                                         no_decay=tr.no_decay)
        cuda = self.device.type == "cuda"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tr.precision) if cuda else None
        self.scaler = torch.amp.GradScaler("cuda") if cuda and tr.precision == "fp16" else None
        self.schedule = build_schedule(spec.diffusion.schedule, spec.diffusion.num_steps)
        k = len(mspec.branches)
        if spec.diffusion.loss_weights:
            if len(spec.diffusion.loss_weights) != k:
                raise UserError(f"diffusion.loss_weights has {len(spec.diffusion.loss_weights)} entries, the "
                                f"model has {k} branches")
            weights = list(spec.diffusion.loss_weights)
            if not spec.diffusion.multiscale_loss:
                weights = [0.0] * (k - 1) + [weights[-1]]
        else:
            weights = default_loss_weights(k, spec.diffusion.multiscale_loss)
        self.loss_weights = weights
        self.noise = torch.Generator().manual_seed(tr.seed)  # CPU: the same numbers on any device
        self.order = BatchOrder(len(self.dataset), tr.batch_size, tr.seed)
        self.step, self.elapsed_before = 0, 0.0
        self.fwd = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.fwd = DDP(self.model, device_ids=[self.device.index] if cuda else None)
        if tr.compile and cuda:
            self.fwd = torch.compile(self.fwd)

    def _resume(self) -> bool:
        """Load checkpoints/last.pt if present; a bad one is a UserError naming it, before any training."""
        if not self.ckpt_path.exists():
            return False
        path = self.ckpt_path
        ckpt = load_checkpoint(path, model_spec=self.spec.model)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.ema.load_state_dict(ckpt["ema"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"], self.noise)
            pos = ckpt["data_position"]
            self.order = BatchOrder(len(self.dataset), self.spec.train.batch_size, self.spec.train.seed,
                                    int(pos["epoch"]), int(pos["index"]))
            step = int(ckpt["step"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
            raise UserError(f"{path}: checkpoint does not match this run ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else ''}); delete it to start over") from None
        if not 0 <= step <= self.spec.train.steps:
            raise UserError(f"{path}: checkpoint step {step} is outside 0..train.steps={self.spec.train.steps}")
        self.step, self.elapsed_before = step, float(ckpt.get("elapsed_s", 0.0))
        return True

    # ---------------------------------------------------------------- training

    def _draw(self, batch: int, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """The random numbers of one global batch, in a fixed order from the checkpointed generator."""
        g = self.noise
        # same order as dimr_lab.diffusion.loss.training_targets (n, eps, drop), then the flips
        n = torch.randint(1, self.schedule.num_steps + 1, (batch,), generator=g)  # (B,) step in 1..N
        eps = torch.randn((batch, *shape), generator=g)  # (B, C, H, W)
        drop = torch.rand(batch, generator=g) < self.spec.diffusion.label_drop  # (B,) -> null label
        flip = torch.rand(batch, generator=g) < 0.5 if self.flip else torch.zeros(batch, dtype=torch.bool)
        return {"n": n, "eps": eps, "drop": drop, "flip": flip}

    def _train(self) -> bool:
        """Run the steps left; True if stopped early (after saving a checkpoint)."""
        tr, dev = self.spec.train, self.device
        B = tr.batch_size
        per = B // self.world
        lo, hi = self.rank * per, (self.rank + 1) * per
        x_shape = tuple(self.dataset[0][0].shape)  # (C, H, W)
        batches = batch_iterator(self.dataset, self.order, self.rank, self.world, self.spec.data.num_workers)
        gmacs = self._gmacs()
        self.session_t0, self.session_steps = time.perf_counter(), 0
        win_t, win_steps = time.perf_counter(), 0
        win_loss = torch.zeros(1 + len(self.loss_weights), dtype=torch.float64)
        bar = self._progress_bar()
        self.fwd.train()
        try:
            while self.step < tr.steps:
                if self._stop_requested():
                    self._save_checkpoint()
                    return True
                self.order.next()  # the position the checkpoint records (the iterator reads the same batch)
                x0, y = next(batches)  # (b, C, H, W), (b,)
                r = self._draw(B, x_shape)
                x0, y = x0.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                flip = r["flip"][lo:hi].to(dev)  # (b,)
                x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)  # random horizontal flips
                eps, n = r["eps"][lo:hi].to(dev), r["n"][lo:hi].to(dev)  # (b, C, H, W), (b,)
                x_t = self.schedule.add_noise(x0, eps, n)  # (b, C, H, W) = sqrt(abar) x0 + sqrt(1-abar) eps
                t = self.schedule.model_time(n)  # (b,) t = n / N
                y_in = torch.where(r["drop"][lo:hi].to(dev), torch.full_like(y, self.null_label), y)  # (b,)
                loss, per_branch = self._step(x_t, t, y_in, eps)
                self.step += 1
                self.session_steps += 1
                win_steps += 1
                win_loss += torch.stack([loss.detach().double().cpu()] +
                                        [p.detach().double().cpu() for p in per_branch])
                if self.step % tr.log_every == 0 or self.step == tr.steps:
                    now = time.perf_counter()
                    self._log(win_loss / win_steps, B * win_steps / (now - win_t), gmacs)
                    win_t, win_steps = now, 0
                    win_loss.zero_()
                if bar is not None:
                    bar[0].update(bar[1], completed=self.step, loss=self.last_loss)
                if self.step % tr.checkpoint_every == 0 or self.step == tr.steps:
                    self._save_checkpoint()
        finally:
            if bar is not None:
                bar[0].stop()
        return False

    def _step(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
              eps: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One optimizer update at self.step; (loss, per-branch losses) of this rank's slice."""
        from dimr_lab.diffusion.loss import diffusion_loss

        tr = self.spec.train
        lr = lr_at(self.step, tr.lr, tr.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            outputs = self.fwd(x_t, t, y)  # [(b, C, h_k, w_k)] lowest resolution first
        # L = sum_k c_k mean((out_k - r_k avgpool_{r_k}(eps))^2)  (multi-scale loss, unit-variance targets)
        loss, per_branch = diffusion_loss(outputs, eps, self.loss_weights)
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
        ema_update(self.ema, self.model, tr.ema_decay)
        return loss, per_branch

    def _stop_requested(self) -> bool:
        """should_stop() or the time limit, agreed over all ranks."""
        limit = self.spec.train.time_limit_s
        stop = bool(self.should_stop and self.should_stop())
        stop = stop or (limit > 0 and time.perf_counter() - self.t0 > limit)
        if self.world > 1:
            flag = torch.tensor([float(stop)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item() > 0)
        return stop

    def _gmacs(self) -> float | None:
        """Forward multiply-accumulates of one image (GMACs), None if it cannot be counted."""
        if not hasattr(self, "_describe"):
            try:
                from dimr_lab.nn.describe import count

                self._describe = count(self.spec.model)
            except Exception:  # the counter is informative only; never fails a run
                self._describe = {"params": sum(p.numel() for p in self.model.parameters()), "gmacs": None}
        return self._describe.get("gmacs")

    # ---------------------------------------------------------------- files

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def _save_checkpoint(self) -> None:
        """Rank 0 writes checkpoints/last.pt atomically."""
        if self.rank == 0:
            atomic_save({
                "format": FORMAT,
                "model_spec": self.spec.model,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": self.step,
                "rng": get_rng_state(self.noise),
                "data_position": self.order.state(),
                "elapsed_s": self.elapsed_before + time.perf_counter() - self.t0,
                "world_size": self.world,
            }, self.ckpt_path)
        self._barrier()

    def _trim_log(self, step: int) -> None:
        """Keep the log lines up to `step` (those after the checkpoint will be written again)."""
        if not self.log_path.exists():
            return
        keep = []
        for line in self.log_path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill
        atomic_write_text(self.log_path, "".join(f"{line}\n" for line in keep))

    last_loss = float("nan")

    def _log(self, means: torch.Tensor, images_per_s: float, gmacs: float | None) -> None:
        """Append one line to log.jsonl (rank 0; losses averaged over ranks and the window)."""
        if self.world > 1:
            means = means.to(self.device)
            torch.distributed.all_reduce(means)
            means = means.cpu() / self.world
        self.last_loss = float(means[0])
        if self.rank != 0:
            return
        row = {"step": self.step, "epoch": self.order.epoch, "loss": float(means[0]),
               "loss_branches": [float(v) for v in means[1:]],
               "lr": lr_at(self.step - 1, self.spec.train.lr, self.spec.train.warmup_steps),
               "images_per_s": images_per_s,
               "gmacs_per_s": TRAIN_MACS_PER_FORWARD * gmacs * images_per_s if gmacs else None,
               "elapsed_s": self.elapsed_before + time.perf_counter() - self.t0}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def _progress_bar(self) -> Any:
        """(rich Progress, task id) on rank 0 when asked, else None."""
        if not self.progress:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TextColumn("ETA"),
                       TimeRemainingColumn())
        task = bar.add_task("train", total=self.spec.train.steps, completed=self.step, loss=float("nan"))
        bar.start()
        return bar, task

    # ---------------------------------------------------------------- after training

    def finish(self) -> dict[str, Any]:
        """Loss curve, sample grid, evaluation and metrics.json (rank 0)."""
        from dimr_lab.train.sampling import class_balanced_labels, generate, save_grid, to_uint8

        spec, out = self.spec, self.out_dir
        train_s = time.perf_counter() - self.t0
        images_per_s = (spec.train.batch_size * self.session_steps / (time.perf_counter() - self.session_t0)
                        if self.session_steps else self._logged_images_per_s())
        plot_loss(self.log_path, out / "loss.png")
        model = self.ema if spec.sample.use_ema else self.model
        model.eval()
        class_names = getattr(self.dataset, "class_names", None)
        t = time.perf_counter()
        labels = class_balanced_labels(spec.sample.grid_size, self.data_classes)
        grid = generate(model, spec, labels, seed=spec.sample.seed, batch_size=spec.eval.batch_size)
        save_grid(to_uint8(grid, spec.data), labels, out / "samples.png", class_names=class_names)
        sample_s = time.perf_counter() - t
        t = time.perf_counter()
        results: dict[str, Any] = {}
        if spec.eval.enabled:
            from dimr_lab.eval import evaluate

            labels = class_balanced_labels(spec.eval.samples, self.data_classes)
            # a seed apart from the grid's, so the evaluated samples are not the grid's again
            x = generate(model, spec, labels, seed=spec.sample.seed + 1, batch_size=spec.eval.batch_size)
            images = to_uint8(x, spec.data)
            results = dict(evaluate(images, labels, spec.data, spec.eval, cache_dir=cache_dir(), seed=DATA_SEED))
            per_sample = {k: np.asarray(results.pop(k)) for k in list(results)
                          if isinstance(results[k], (np.ndarray, torch.Tensor))}
            if per_sample:  # the samples with their class probabilities: `dimr-lab distortion` reads them
                np.savez_compressed(out / "eval_per_sample.npz", labels=labels.numpy(), images=images.numpy(),
                                    **per_sample)
                from dimr_lab.eval.distortion import distortion_report

                distortion_report(out)
            results.setdefault("kid", results.get("kid_mean"))
            results.setdefault("isc", results.get("isc_mean"))
        eval_s = time.perf_counter() - t
        self._gmacs()
        desc = self._describe
        metrics = {key: results.get(key) for key in ("fid", "kid", "isc", "precision", "recall",
                                                     "sample_accuracy", "distortion_rate")}
        metrics.update({k: v for k, v in results.items() if k not in metrics})
        metrics.update({
            "params": desc.get("params"), "gmacs": desc.get("gmacs"),
            "train_images_per_s": images_per_s, "steps": self.step,
            "final_loss": self._last_logged("loss"),
            "wall_s": self.elapsed_before + train_s + sample_s + eval_s,
            "train_s": self.elapsed_before + train_s, "sample_s": sample_s, "eval_s": eval_s,
            "eval": {"enabled": spec.eval.enabled, "samples": spec.eval.samples if spec.eval.enabled else 0,
                     "sampler": spec.sample.sampler, "steps": spec.sample.steps, "order": spec.sample.order,
                     "guidance_scale": spec.sample.guidance_scale, "guidance_form": spec.sample.guidance_form,
                     "guidance_schedule": spec.sample.guidance_schedule, "ema": spec.sample.use_ema,
                     "extractor": spec.eval.feature_extractor, "seed": spec.sample.seed + 1},
            "device": str(self.device), "world_size": self.world,
            "versions": versions(), **{f"git_{k}": v for k, v in git_commit().items()},
        })
        atomic_write_text(out / "metrics.json", json.dumps(_jsonable(metrics), indent=2) + "\n")
        return metrics

    def _logged_rows(self) -> list[dict[str, Any]]:
        rows = []
        if self.log_path.exists():
            for line in self.log_path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
        return rows

    def _last_logged(self, key: str) -> Any:
        rows = self._logged_rows()
        return rows[-1].get(key) if rows else None

    def _logged_images_per_s(self) -> float | None:
        """Mean images/s over the log (when this session trained no step)."""
        vals = [r["images_per_s"] for r in self._logged_rows() if r.get("images_per_s")]
        return sum(vals) / len(vals) if vals else None


def _jsonable(obj: Any) -> Any:
    """Plain JSON types (tensors and numpy scalars to numbers; NaN/inf to None)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        obj = obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def plot_loss(log_path: Path, png: Path) -> None:
    """Loss (total and per branch) against step from log.jsonl, as a PNG (matplotlib Agg)."""
    if not Path(log_path).exists():
        return
    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in rows], label="total", color="black")
    for k in range(len(rows[0].get("loss_branches", []))):
        ax.plot(steps, [r["loss_branches"][k] for r in rows], label=f"branch {k}", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
