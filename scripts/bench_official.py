#!/usr/bin/env python
"""Speed check against the released DiMR code: same weights, same outputs, training-step time and memory.

    python scripts/bench_official.py --official /path/to/DiMR-checkout [--t-depth 5 --c-depth 4 --batch 2]
    python scripts/bench_official.py --official ... --device cuda --dtype bfloat16 --t-depth 39 --c-depth 20 --batch 64

1. Builds the released MRModel (imported from the checkout given; nothing of it is copied here) with
   DiMR-XL/2R's widths at reduced depth, randomises every weight (time-dependent p0/p1/w/b included)
   and saves its state dict.
2. Converts that state dict with dimr_lab.nn.official and checks that both networks give the same
   outputs (relative error < 1e-4, per-sample t) and the same gradients.
3. Times a training step (forward + backward + AdamW) and a forward pass of each configuration, each
   in a fresh process (so that its peak RSS is its own), `--repeats` times interleaved, and reports
   medians side by side:
     released          the released model as it ships: every block wrapped in torch.utils.checkpoint
     released-nockpt   the same with the blocks' checkpoint bypassed (their `_forward`)
     ours              dimr-lab, no checkpointing (its default)
     ours-ckpt         dimr-lab with activation checkpointing of every block
   Memory is compared at the same checkpointing (ours vs released-nockpt, ours-ckpt vs released).
`--profile CONFIG` prints torch.profiler's top operators of one training step instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

CONFIGS = ("released", "released-nockpt", "ours", "ours-ckpt")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: this checkout's dimr_lab, not another installed copy
    sys.path.insert(1, str(ROOT))


class Args:
    """The attribute bag the released configs are written in."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def import_released(path: str):
    path = str(Path(path).resolve())
    if not (Path(path) / "libs" / "core" / "blocks.py").is_file():
        sys.exit(f"error: {path} is not a DiMR checkout (no libs/core/blocks.py)")
    if path not in sys.path:
        sys.path.insert(0, path)
    warnings.filterwarnings("ignore")  # timm deprecation, tdp_torch fallback, checkpoint use_reentrant
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from libs.core import blocks

    return blocks


def our_spec(args):
    from dimr_lab.spec.model_spec import resolve_model

    return resolve_model({"preset": "dimr_xl_2r", "name": f"DiMR-XL/2R (T depth {args.t_depth}, C depth "
                                                          f"{args.c_depth})",
                          "branches": [{"depth": args.t_depth}, {"depth": args.c_depth}]})


def count_ours(args) -> float:
    """MACs per image of the configuration (meta device, no weights): for TFLOP/s and MFU."""
    from dimr_lab.nn.describe import count

    return count(our_spec(args))["gmacs"] * 1e9


def released_model(blocks, spec):
    from dimr_lab.nn.official import official_config

    cfg = official_config(spec)
    cfg["stage_configs"] = [Args(**s) for s in cfg["stage_configs"]]
    return blocks.MRModel(Args(**cfg))


def bypass_checkpoint(model) -> None:
    """Run the released blocks without their torch.utils.checkpoint wrapper."""
    for module in model.modules():
        if hasattr(module, "_forward") and type(module).__name__ in ("TransformerBlock", "ConvNeXtBlock"):
            module.forward = module._forward


def released_call(model, x, t, y):
    return model(x, log_snr=8 * t - 4, y=y)


def make_weights(args, path: Path) -> None:
    import torch

    blocks = import_released(args.official)
    torch.manual_seed(args.seed)
    model = released_model(blocks, our_spec(args))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("param0", "param1")):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(("nodecay_weight", "nodecay_bias")):
                p.copy_(torch.randn_like(p) * 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.02)
    torch.save(model.state_dict(), path)


def build(config: str, args, state_path: Path):
    """(model, call, t_mode, spec) for a configuration, weights from the saved released state dict."""
    import torch

    from dimr_lab.nn.network import build_model
    from dimr_lab.nn.official import convert_official_state_dict

    sd = torch.load(state_path, map_location="cpu", weights_only=True)
    if config.startswith("released"):
        blocks = import_released(args.official)
        model = released_model(blocks, our_spec(args))
        model.load_state_dict(sd)
        if config == "released-nockpt":
            bypass_checkpoint(model)
        call = released_call
    else:
        spec, ours = convert_official_state_dict(sd, heads=16)
        model = build_model(spec)
        model.load_state_dict(ours)
        model.set_checkpointing(config == "ours-ckpt")
        call = None
    del sd
    return model.to(args.device), call


def check_equal(args, state_path: Path) -> dict:
    """Outputs and gradients of the released model and ours on the same weights and inputs."""
    import torch

    from dimr_lab.nn.official import key_pairs

    spec = our_spec(args)
    torch.backends.cudnn.allow_tf32 = False  # float32 convolutions on both sides (the check is in float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    released, _ = build("released", args, state_path)
    ours, _ = build("ours", args, state_path)
    gen = torch.Generator().manual_seed(1)
    B = min(args.batch, 8)
    dev = torch.device(args.device)
    x = torch.randn(B, spec.in_channels, spec.image_size, spec.image_size, generator=gen).to(dev)
    t = torch.rand(B, generator=gen).to(dev)
    y = torch.randint(0, spec.num_classes, (B,), generator=gen).to(dev)
    a = released_call(released, x, t, y)
    b = ours(x, t, y)
    out_err = [((u - v).norm() / u.norm()).item() for u, v in zip(a, b)]
    sum(o.square().mean() for o in a).backward()
    sum(o.square().mean() for o in b).backward()
    rp, op = dict(released.named_parameters()), dict(ours.named_parameters())
    ga = torch.cat([rp[k].grad.reshape(-1) for k, _ in key_pairs(ours.spec)])
    gb = torch.cat([op[m].grad.reshape(-1) for _, m in key_pairs(ours.spec)])
    shared = torch.full((B,), float(t[0]), device=dev)
    a1, b1 = released_call(released, x, shared, y), ours(x, shared, y)
    shared_err = [((u - v).norm() / u.norm()).item() for u, v in zip(a1, b1)]
    return {"output_rel_err": out_err, "shared_t_rel_err": shared_err,
            "grad_rel_err": ((ga - gb).norm() / ga.norm()).item()}


def child(args) -> None:
    import torch

    from dimr_lab.bench import bench_model, ours_call, rss_mib

    torch.set_num_threads(args.threads)
    baseline = rss_mib()
    model, call = build(args.child, args, Path(args.state))
    spec = our_spec(args)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        dev = torch.device(args.device)
        x = torch.randn(args.batch, spec.in_channels, spec.image_size, spec.image_size, generator=gen).to(dev)
        t = torch.rand(args.batch, generator=gen).to(dev)
        y = torch.randint(0, spec.num_classes, (args.batch,), generator=gen).to(dev)
        fn = call or ours_call
        autocast = torch.autocast(dev.type, dtype=getattr(torch, args.dtype), enabled=args.dtype != "float32")

        def step():
            with autocast:
                loss = sum(o.float().square().mean() for o in fn(model, x, t, y))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        cuda = dev.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            step()
            if cuda:
                torch.cuda.synchronize(dev)
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.profile_rows))
        return
    # the released code as it ships trains with torch.optim.AdamW's default implementation; ours with the
    # trainer's (dimr_lab.train.loop.build_optimizer: fused where the device has the kernel)
    optimizer = (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4)) if args.child.startswith("released") else None
    res = bench_model(model, batch=args.batch, image_size=spec.image_size, in_channels=spec.in_channels,
                      num_classes=spec.num_classes, steps=args.steps, warmup=args.warmup,
                      dtype=args.dtype, device=args.device, macs_per_image=args.macs,
                      call=call or ours_call, baseline_mib=baseline, optimizer=optimizer)
    res["params"] = sum(p.numel() for p in model.parameters())
    print(json.dumps(res))


def run_child(args, config: str, state: Path, profile: bool = False) -> dict | str:
    cmd = [sys.executable, __file__, "--official", args.official, "--child", config, "--state", str(state),
           "--t-depth", str(args.t_depth), "--c-depth", str(args.c_depth), "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--device", args.device, "--dtype", args.dtype, "--macs", str(args.macs)]
    if profile:
        cmd += ["--profile", "--profile-rows", str(args.profile_rows)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"error: {config} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout if profile else json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", required=True, help="a checkout of github.com/qihao067/DiMR")
    p.add_argument("--t-depth", type=int, default=5, help="Transformer num_blocks (XL/2R: 39)")
    p.add_argument("--c-depth", type=int, default=4, help="ConvNeXt num_blocks (XL/2R: 20)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="processes per configuration, interleaved")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="bfloat16/float16: torch.autocast with float32 weights, in both codes")
    p.add_argument("--macs", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_out", help="write all measurements here")
    p.add_argument("--profile", nargs="?", const="ours", default=None,
                   help="print the profile of one training step of CONFIG (released, ours, ...)")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.profile = bool(args.profile)
        child(args)
        return

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device is available")
    args.macs = count_ours(args)
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            sys.exit(f"error: unknown config {c!r}; known: {', '.join(CONFIGS)}")
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "released.pt"
        make_weights(args, state)
        if args.profile:
            if args.profile not in CONFIGS:
                sys.exit(f"error: unknown config {args.profile!r}; known: {', '.join(CONFIGS)}")
            print(run_child(args, args.profile, state, profile=True))
            return
        torch.set_num_threads(args.threads)
        eq = check_equal(args, state)
        if args.device == "cuda":  # the check's two networks stay in this process's cache: give the GPU back
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        print(f"same weights: output rel. err. per branch {['%.1e' % e for e in eq['output_rel_err']]} "
              f"(shared t {['%.1e' % e for e in eq['shared_t_rel_err']]}), gradient rel. err. "
              f"{eq['grad_rel_err']:.1e}", flush=True)
        if max(eq["output_rel_err"] + eq["shared_t_rel_err"]) >= 1e-4:
            sys.exit("error: outputs differ (relative error >= 1e-4); not timing")
        runs: dict[str, list[dict]] = {c: [] for c in configs}
        for r in range(args.repeats):
            for c in configs:
                start = time.time()
                runs[c].append(run_child(args, c, state))
                print(f"  repeat {r + 1}/{args.repeats} {c}: train {runs[c][-1]['train_step_s']:.3f} s/step "
                      f"({runs[c][-1]['train_cpu_s']:.3f} CPU s), "
                      f"forward {runs[c][-1]['forward_s']:.3f} s, peak {runs[c][-1]['peak_memory_mib']:.0f} MiB "
                      f"({time.time() - start:.0f} s)", flush=True)
    summary = {}
    for c, rs in runs.items():
        summary[c] = {"train_step_s": statistics.median(r["train_step_s"] for r in rs),
                      "train_cpu_s": statistics.median(r["train_cpu_s"] for r in rs),
                      "forward_s": statistics.median(r["forward_s"] for r in rs),
                      "forward_cpu_s": statistics.median(r["forward_cpu_s"] for r in rs),
                      "peak_memory_mib": statistics.median(r["peak_memory_mib"] for r in rs),
                      "memory_exact": all(r["memory_exact"] for r in rs), "params": rs[0]["params"],
                      "train_step_s_all": [r["train_step_s"] for r in rs],
                      "train_tflops": statistics.median(r.get("train_tflops") or 0.0 for r in rs),
                      "mfu": statistics.median(r.get("mfu") or 0.0 for r in rs), "device_name": rs[0]["device_name"]}
    base = summary.get("released")
    same_ckpt = {"ours": "released-nockpt", "ours-ckpt": "released", "released": "released",
                 "released-nockpt": "released-nockpt"}
    ckpt = {"released": "every block", "released-nockpt": "none", "ours": "none", "ours-ckpt": "every block"}
    device_name = next(iter(summary.values()))["device_name"] if summary else args.device
    print(f"\nDiMR-XL/2R widths, T depth {args.t_depth}, C depth {args.c_depth}; batch {args.batch}, {args.dtype}, "
          f"{device_name}, {args.threads} thread(s), torch {torch.__version__}; medians of {args.repeats} processes x "
          f"{args.steps} steps\n")
    print("| config | checkpointing | train step s (wall) | train img/s | speed-up vs released (wall) | "
          "train step CPU s | speed-up vs released (CPU time) | forward s (wall / CPU) | peak MiB (train) | "
          "memory vs released, same checkpointing | train TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for c, s in summary.items():
        speed = f"{base['train_step_s'] / s['train_step_s']:.2f}x" if base else "-"
        speed_cpu = f"{base['train_cpu_s'] / s['train_cpu_s']:.2f}x" if base else "-"
        ref = summary.get(same_ckpt[c])
        mem = f"{s['peak_memory_mib'] / ref['peak_memory_mib']:.2f}x" if ref else "-"
        print(f"| {c} | {ckpt[c]} | {s['train_step_s']:.3f} | {args.batch / s['train_step_s']:.2f} | {speed} | "
              f"{s['train_cpu_s']:.3f} | {speed_cpu} | {s['forward_s']:.3f} / {s['forward_cpu_s']:.3f} | "
              f"{s['peak_memory_mib']:.0f}{'' if s['memory_exact'] else ' (bound)'} | {mem} | "
              f"{s['train_tflops']:.3g} | {format(s['mfu'], '.1%') if s['mfu'] else '-'} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"equivalence": eq, "summary": summary, "runs": runs,
                                                   "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
