"""Operators run per training step of an ablation's networks, eager and with compiled blocks.

    .venv/bin/python scripts/count_ops.py ablations/table2_components.toml --profile gpu [--variants dimr,uvit]
                                         [--batch 128] [--eager-only] [--json]

Small networks sharing one GPU are bound by how many kernels a step launches, not by arithmetic. This counts,
with torch.profiler on the CPU, the operators one training step (forward, loss, backward, gradients set to
None as the trainer does) runs: eagerly, every aten operator that computes (views and allocations left
out); with `train.compile`'s regional compilation, inductor's fused kernels plus the operators it leaves
(matmuls, convolutions, attention, and what lies between the blocks). Inductor fuses on the CPU as it does
for GPUs, but its CPU and GPU kernels differ: read the counts as a proxy for the GPU's launches, not as them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# aten operators that only make views or allocate: no kernel of their own on a GPU
VIEWS = {"view", "_unsafe_view", "as_strided", "t", "transpose", "permute", "reshape", "expand", "unsqueeze",
         "squeeze", "detach", "alias", "empty", "empty_like", "empty_strided", "slice", "select", "split",
         "split_with_sizes", "chunk", "unbind", "_reshape_alias", "unflatten", "flatten", "lift_fresh",
         "new_empty_strided", "view_as", "narrow"}


def resolved_runs(ablation: str, profile: str) -> list[dict]:
    """The dry run's resolved runs (one seed), as `dimr-lab run --dry-run --json` prints them."""
    out = subprocess.run([sys.executable, "-m", "dimr_lab", "run", ablation, "--profile", profile, "--dry-run",
                          "--json", "--seeds", "0"], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        sys.exit(out.stderr.strip() or f"dimr-lab run --dry-run failed ({out.returncode})")
    return [r for r in map(json.loads, out.stdout.splitlines()) if "variant" in r]


def count_step(model_spec: dict, batch: int, compiled: bool) -> dict[str, int]:
    """{'aten': operators outside fused kernels, 'fused': inductor kernels} of one training step."""
    import torch
    import torch._inductor.config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    from dimr_lab.nn.network import build_model
    from dimr_lab.spec.model_spec import resolve_model

    spec = resolve_model(model_spec)
    inductor_config.cpp.enable_kernel_profile = True  # each fused kernel shows as a profiler event
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(spec)
    if compiled:
        model.compile_blocks()
    x = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size)
    t, y = torch.rand(batch), torch.randint(0, spec.num_classes, (batch,))

    def step() -> None:
        for p in model.parameters():
            p.grad = None
        loss = sum(o.float().pow(2).mean() for o in model(x, t, y))
        loss.backward()

    step()
    step()  # compiled: both graphs made before the counted step
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    top = [e for e in prof.events() if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return {"aten": sum(1 for e in top if e.name.startswith("aten::") and e.name[len("aten::"):] not in VIEWS),
            "fused": sum(1 for e in top if "cpp_fused" in e.name)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ablation")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--variants", default="", help="comma-separated (default: every variant)")
    ap.add_argument("--batch", type=int, default=0, help="default: the profile's train.batch_size")
    ap.add_argument("--eager-only", action="store_true", help="skip compiling (fast)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    wanted = [v for v in args.variants.split(",") if v]
    rows = []
    for run in resolved_runs(args.ablation, args.profile):
        if wanted and run["variant"] not in wanted:
            continue
        batch = args.batch or run["spec"]["train"]["batch_size"]
        row = {"variant": run["variant"], "network": run["spec"]["model"]["name"], "batch": batch,
               "eager": count_step(run["spec"]["model"], batch, compiled=False)["aten"]}
        if not args.eager_only:
            c = count_step(run["spec"]["model"], batch, compiled=True)
            row.update(compiled=c["aten"] + c["fused"], compiled_fused=c["fused"], compiled_aten=c["aten"])
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            more = "" if args.eager_only else (f"  compiled {row['compiled']:5d} ({row['compiled_fused']} fused "
                                               f"kernels + {row['compiled_aten']} operators)")
            print(f"{row['variant']:14s} {row['network']:16s} batch {batch}: eager {row['eager']:5d}{more}",
                  flush=True)
    if not rows:
        sys.exit(f"no variant of {args.ablation} named {args.variants!r}")


if __name__ == "__main__":
    main()
