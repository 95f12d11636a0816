"""Experiment tracking through the field's tools, off by default: TensorBoard event files and wandb.

Switched on by the run spec's [track] section (an ablation's [base] or a profile sets it for every run):

    [track]
    tensorboard = true          # event files in <run>/tensorboard (tensorboard --logdir results/<ablation>)
    wandb = true                # a wandb run, offline unless track.wandb_mode = "online"
    wandb_project = "dimr-lab"

What is logged: the training loss (total and per branch), learning rate, images/s and threads at every log
row; at each evaluation its metrics and the sample grid. wandb runs are grouped by ablation, typed by
variant and named after the run folder. Both are optional extras (`pip install 'dimr-lab[tracking]'`);
asking for one that is not installed is a clear error before training starts.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from dimr_lab.errors import SpecError


def check_available(track: Any) -> None:
    """Refuse, before anything runs, a tracker whose package is missing."""
    if track.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise SpecError("needs the tensorboard package: pip install 'dimr-lab[tracking]'", key="track.tensorboard")
    if track.wandb and importlib.util.find_spec("wandb") is None:
        raise SpecError("needs the wandb package: pip install 'dimr-lab[tracking]'", key="track.wandb")


class Tracker:
    """Fans each record out to the trackers the spec switches on (rank 0 only; a no-op when none)."""

    def __init__(self, spec: Any, run_dir: Path, record: Any = None, *, enabled: bool = True):
        self.writers: list[Any] = []
        if not enabled:
            return
        track = spec.track
        check_available(track)
        if track.tensorboard:
            self.tb_dir = str(Path(run_dir) / "tensorboard")
            self._tb: Any = None
            self._purge_step: int | None = None
            self.writers.append("tensorboard")
        if track.wandb:
            import wandb

            from dimr_lab.spec.schema import to_dict

            os.environ.setdefault("WANDB_SILENT", "true")
            ablation = getattr(record, "ablation", "") or "single runs"
            # the folder's name, without the characters wandb refuses in a run id (`train --out 'lr,1e-3'`)
            run_id = "".join("-" if c in ":;,#?/'" else c for c in Path(run_dir).name).lstrip()
            try:
                self.wb = wandb.init(project=track.wandb_project, dir=str(run_dir), mode=track.wandb_mode,
                                     group=ablation, job_type=getattr(record, "variant", "") or Path(run_dir).name,
                                     name=Path(run_dir).name, id=f"{run_id}-{spec.identity_hash()}",
                                     resume="allow", reinit=True,
                                     config={"spec": to_dict(spec), "seed": spec.train.seed,
                                             "variant": getattr(record, "variant", ""), "ablation": ablation})
            except wandb.errors.Error as err:  # online without a login or a connection, ...
                why = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise SpecError(f"wandb could not start the run in mode {track.wandb_mode!r} ({why})"
                                + ('; track.wandb_mode = "offline" records it in the run folder'
                                   if track.wandb_mode == "online" else ""), key="track.wandb_mode") from None
            # evaluations come after training, so one of an earlier step (eval.steps) arrives once wandb's history
            # is past it, where wandb drops it: they have their own axis, eval/step, and a history row of their own
            self.wb.define_metric("eval/step")
            self.wb.define_metric("eval/*", step_metric="eval/step")
            self._wb_last = -1  # the last history step written
            self._wb_eval_at: dict[int, int] = {}  # evaluated step -> the history step holding it
            self.writers.append("wandb")

    def resume_at(self, step: int) -> None:
        """Training goes on after `step`: TensorBoard drops the events a killed session wrote after it (the
        log's rows after the checkpoint are written again; at step 0, a session killed before its first
        checkpoint: its log is emptied, its events dropped). wandb keeps the first value it got for a step
        and ignores the repeats."""
        if "tensorboard" in self.writers and self._tb is None \
                and (step > 0 or any(Path(self.tb_dir).glob("events.out.tfevents.*"))):
            self._purge_step = step + 1

    @property
    def tb(self) -> Any:
        if self._tb is None:  # opened on first use, so that resume_at can set what to purge
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=self.tb_dir, purge_step=self._purge_step)
        return self._tb

    def scalars(self, step: int, values: dict[str, float]) -> None:
        values = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        if "tensorboard" in self.writers:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if "wandb" in self.writers:
            self._wandb_log(step, values)

    def _wandb_log(self, step: int, values: dict[str, Any]) -> None:
        if not any(k.startswith("eval/") for k in values):
            self.wb.log(values, step=step)
        else:
            at = self._wb_eval_at.get(step)
            if at is None:  # the row of its training step while that is the last one, else the next free one
                at = self._wb_eval_at[step] = max(step, self._wb_last + (step < self._wb_last))
            self.wb.log({**values, "eval/step": step}, step=at)
            step = at
        self._wb_last = max(self._wb_last, step)

    def image(self, step: int, tag: str, png: Path) -> None:
        if not self.writers or not Path(png).is_file():
            return
        import numpy as np
        from PIL import Image

        with Image.open(png) as im:
            arr = np.asarray(im.convert("RGB"))  # (H, W, 3)
        if "tensorboard" in self.writers:
            self.tb.add_image(tag, arr, step, dataformats="HWC")
        if "wandb" in self.writers:
            import wandb

            self._wandb_log(step, {tag: wandb.Image(arr)})

    def close(self) -> None:
        if "tensorboard" in self.writers and self._tb is not None:
            self._tb.close()
        if "wandb" in self.writers:
            self.wb.finish()
        self.writers = []


def train_row_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The tracked values of one log.jsonl row."""
    out = {"train/loss": row.get("loss"), "train/lr": row.get("lr"), "train/images_per_s": row.get("images_per_s"),
           "train/threads": row.get("threads")}
    for k, v in enumerate(row.get("loss_branches") or []):
        out[f"train/loss_branch{k}"] = v
    return {k: v for k, v in out.items() if isinstance(v, (int, float))}


def eval_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    keys = ("fid", "kid", "isc", "precision", "recall", "sample_accuracy", "distortion_rate", "fid_floor",
            "sample_images_per_s")
    return {f"eval/{k}": metrics[k] for k in keys if isinstance(metrics.get(k), (int, float))}
