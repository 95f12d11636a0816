"""Commands about released weights and speed: `convert-official`, `bench`."""

from __future__ import annotations

import json
import math
from typing import Optional

import typer

from dimr_lab.cli import app


@app.command("convert-official")
def convert_official(
    src: str = typer.Argument(..., help="a state dict saved by the released DiMR code (e.g. its nnet_ema.pth)"),
    dst: str = typer.Argument(..., help="where to write the dimr-lab checkpoint (weights + resolved spec)"),
    heads: int = typer.Option(16, "--heads", min=1, help="attention heads (not recorded in the weights)"),
    force: bool = typer.Option(False, "--force", help="replace an existing destination"),
) -> None:
    """Convert released DiMR weights: infer the architecture from the tensors' shapes, write our checkpoint."""
    from rich.console import Console

    from dimr_lab.nn.official import convert_official as _convert

    info = _convert(src, dst, heads=heads, force=force)
    spec = info["spec"]
    console = Console()
    console.print(f"[bold]{spec.name}[/bold]: {spec.image_size}x{spec.image_size}x{spec.in_channels}, "
                  f"{spec.num_classes} classes (+ null), block norm {spec.norm}")
    for i, (b, res) in enumerate(zip(spec.branches, spec.resolutions())):
        extra = f"{b.heads} heads" if b.block == "transformer" else f"kernel {b.kernel}"
        console.print(f"  branch {i}: {b.block}, width {b.width}, {b.depth // 2 * 2 + 1} blocks, MLP {b.mlp_width}, "
                      f"{res}x{res} tokens (patch {b.patch}), {extra}, out kernel {b.out_kernel}")
    console.print(f"{info['params'] / 1e6:.2f}M parameters ({info['td_params'] / 1e6:.3f}M time-dependent) "
                  f"in {info['tensors']} tensors"
                  + (f" (the file's {info['key']!r} entry{', its EMA weights' if 'ema' in info['key'] else ''})"
                     if info["key"] else "") + f" -> {info['dst']}")


@app.command()
def bench(
    model: str = typer.Argument(..., help="a preset name or a model TOML file"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="override a model key, e.g. branches.0.depth=5"),
    batch: int = typer.Option(8, "--batch", help="images per step"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, or bfloat16/float16 (autocast, fp32 weights)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    steps: int = typer.Option(5, "--steps", help="timed steps (the median is reported)"),
    warmup: int = typer.Option(2, "--warmup", help="untimed steps first"),
    checkpointing: bool = typer.Option(False, "--checkpointing", help="activation checkpointing of every block"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile as train.compile does: each block, one graph per kind"),
    sample_nfe: int = typer.Option(0, "--sample-nfe", min=0, help="also time the sampler at this many network "
                                                                  "evaluations per sample, with and without guidance"),
    guidance: float = typer.Option(1.5, "--guidance", help="the guidance scale of the guided sampling timing"),
    sample_batch: int = typer.Option(0, "--sample-batch", min=0, help="images sampled at a time (0 = --batch)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """Training-step images/s (forward + backward + AdamW), forward images/s, peak memory, TFLOP/s and MFU;
    sampling images/s with --sample-nfe."""
    from dimr_lab.bench import DTYPES, bench as _bench
    from dimr_lab.cli.model_cmds import _load_model_spec
    from dimr_lab.errors import UserError

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {device!r}")
    if not math.isfinite(guidance):
        raise UserError(f"--guidance {guidance}: must be a finite number")
    spec = _load_model_spec(model, set_)
    info = _bench(spec, batch=batch, dtype=dtype, device=device, steps=steps, warmup=warmup,
                  checkpointing=checkpointing, compile=compile_, sample_nfe=sample_nfe, sample_guidance=guidance,
                  sample_batch=sample_batch)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    def fmt(v, spec_: str = ".2f") -> str:
        return "-" if v is None else format(v, spec_)

    table = Table(title=f"{info['model']}: {info['params'] / 1e6:.2f}M params, {info['gmacs_per_image']:.2f} "
                        f"GMACs/image; batch {batch}, {dtype}, {info['device_name']}, {info['threads']} threads"
                        + (", checkpointing" if checkpointing else "") + (", compiled" if compile_ else ""))
    for col in ("phase", "s/step", "CPU s/step", "images/s", "TFLOP/s", "MFU", "peak MiB"):
        table.add_column(col, justify="right")
    mem_note = "" if info.get("memory_exact", True) else " (bound)"
    table.add_row("train", fmt(info["train_step_s"], ".3f"), fmt(info["train_cpu_s"], ".3f"),
                  fmt(info["train_images_per_s"]), fmt(info.get("train_tflops"), ".3f"), fmt(info.get("mfu"), ".1%"),
                  fmt(info["peak_memory_mib"], ".0f") + mem_note)
    table.add_row("forward", fmt(info["forward_s"], ".3f"), fmt(info["forward_cpu_s"], ".3f"),
                  fmt(info["forward_images_per_s"]), fmt(info.get("forward_tflops"), ".3f"),
                  fmt(info.get("forward_mfu"), ".1%"), fmt(info["forward_peak_memory_mib"], ".0f"))
    for row in info.get("sampling", []):
        table.add_row(f"sample {row['nfe']} NFE, batch {row['batch']}"
                      + (f", guidance {row['guidance']}" if row["guidance"] else ""),
                      fmt(row["seconds"], ".3f"), "-", fmt(row["images_per_s"]), "-", "-", "-")
    console = Console()
    console.print(table)
    console.print(f"train = forward + backward + AdamW step; forward without gradients; medians of {steps} steps "
                  f"after {warmup}. Memory: {info['memory_measure']}.")
    if compile_:
        console.print(f"compiled: {info['compiled_graphs']} graphs, {info['compile_fallbacks']} frames left eager; "
                      f"the warm-up calls took {info['first_calls_extra_s']:.1f} s more than steady ones "
                      f"(compilation); {info['wall_s']:.1f} s in all for the warm-up and timed calls")
