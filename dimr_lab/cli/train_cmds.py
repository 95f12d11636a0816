"""Commands: train (one run: train, sample, evaluate; resumable) and sample (a grid from a run)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dimr_lab.cli import app


@app.command()
def train(
    spec: Optional[Path] = typer.Argument(None, help="run spec TOML; none = the built-in default"),
    out: Path = typer.Option(..., "--out", "-o", help="run directory (the same command on it again resumes)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a spec key: section.key=value"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="rich progress bar"),
) -> None:
    """Train, sample and evaluate one run into OUT (resumes OUT; refuses a different spec)."""
    import signal
    import sys

    from dimr_lab.spec.run_spec import load_run_spec
    from dimr_lab.spec.schema import parse_overrides

    run_spec = load_run_spec(spec, parse_overrides(set_))
    from dimr_lab.train.trainer import train_run

    # SIGTERM / SIGUSR1 (SLURM preemption, time limits): checkpoint at the next step, then exit 143
    stop = {"signal": None}

    def _request_stop(signum, _frame):
        stop["signal"] = signum

    for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            signal.signal(sig, _request_stop)
    result = train_run(run_spec, out, should_stop=lambda: stop["signal"] is not None, progress=progress)
    if result.get("interrupted"):
        print(f"stopped at step {result.get('step')}; checkpoint saved in {out}; run the same command to resume",
              file=sys.stderr)
        raise typer.Exit(143)
    if "rank" in result:
        return
    keys = ("sample_accuracy", "distortion_rate", "fid", "kid", "steps", "wall_s")
    shown = ", ".join(f"{k}={result[k]:.4g}" if isinstance(result.get(k), float) else f"{k}={result.get(k)}"
                      for k in keys if k in result)
    print(f"done: {out}/metrics.json ({shown})")


@app.command()
def sample(
    run_dir: Path = typer.Argument(..., help="a run directory (spec.json + checkpoints/last.pt)"),
    n: int = typer.Option(64, "--n", min=1, help="number of samples (class-balanced labels)"),
    out: Path = typer.Option(Path("grid.png"), "--out", "-o", help="PNG to write"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="guidance scale (default: the run's)"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="sampler steps (default: the run's)"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="dpm_solver++, dpm_solver++_fast or ddim"),
    order: Optional[int] = typer.Option(None, "--order", min=1, max=3, help="DPM-Solver++ order"),
    seed: int = typer.Option(0, "--seed", help="seed of the starting noise"),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="EMA weights (default) or the raw ones"),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
) -> None:
    """Write a labelled grid of N samples from RUN_DIR's last checkpoint."""
    import torch

    from dimr_lab.train.sampling import class_balanced_labels, generate, load_run_model, save_grid, to_uint8

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, spec = load_run_model(run_dir, ema=ema, device=device)
    # the dataset's classes where the spec names them (a network may have more label rows than it uses)
    classes = min(spec.data.num_classes or model.spec.num_classes, model.spec.num_classes)
    labels = class_balanced_labels(n, classes)
    x = generate(model, spec, labels, seed=seed, batch_size=batch_size, sampler=sampler, steps=steps,
                 order=order, guidance_scale=guidance)
    class_names = _class_names(spec)
    save_grid(to_uint8(x, spec.data), labels, out, class_names=class_names)
    print(f"wrote {out} ({n} samples)")


def _class_names(spec) -> list[str] | None:
    """The dataset's class names where cheap to know (built-in datasets), else None (numbers)."""
    if spec.data.name == "shapes":
        from dimr_lab.data.shapes import SHAPE_NAMES

        return list(SHAPE_NAMES)
    if spec.data.name == "digits":
        return [str(i) for i in range(10)]
    return None


@app.command()
def distortion(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    threshold: Optional[float] = typer.Option(None, help="flag p(class) below this (default: the run's "
                                                          "eval.distortion_threshold)"),
    max_images: int = typer.Option(64, "--max", help="at most this many flagged samples in the grid"),
    out: Optional[Path] = typer.Option(None, help="the grid PNG (default RUN_DIR/distortion.png)"),
) -> None:
    """The paper's low-fidelity detector: a grid of the samples the classifier flags, and their share."""
    from dimr_lab.eval.distortion import distortion_report

    report = distortion_report(run_dir, threshold=threshold, max_images=max_images, out=out)
    print(f"distortion rate {report['distortion_rate']:.3f} ({report['flagged']}/{report['samples']} samples "
          f"with p(class) < {report['threshold']})" + (f"; grid: {report['grid']}" if "grid" in report else ""))
