"""Where the CPU training step of the built-in default run goes, and how far kernels could take it.

    .venv/bin/python scripts/cpu_bound.py [--steps 20] [--threads 1] [--json]

Three measurements side by side in one process, one thread by default:

1. torch.profiler over `--steps` steps of the default run's training loop (after 20 warm-up steps; the
   trainer itself, evaluation off), operator self time grouped by category (the categories of
   scripts/gpu_suite.py), in ms per step, with the number of operators per step;
2. every linear layer of the default network at the default batch: the forward product, the input
   gradient and the weight gradient, each as its own matmul, in GFLOP/s, against square float32 matmuls
   (256 to 2048) on the same core: how close the network's matmuls are to what the core does at best;
3. the default network's training step in float32 and under bfloat16 autocast (`dimr-lab bench`'s step).

A step's time that is matmul at the core's best rate cannot shrink by scheduling or fusion; what is left
(the rest of the profile) bounds what any change of the kernels can win at float32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from gpu_suite import categorize  # noqa: E402 (scripts/ is on sys.path when a script runs): the operator categories


def profile_training(steps: int) -> dict:
    import torch

    from dimr_lab.spec.run_spec import load_run_spec
    from dimr_lab.spec.schema import parse_overrides
    from dimr_lab.train import trainer as T

    warm = 20
    spec = load_run_spec(None, parse_overrides([f"train.steps={warm + steps + 1}", "eval.enabled=false",
                                                "train.checkpoint_every=100000", "train.threads=1"]))
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    marks: dict[str, float] = {}
    original = T.Trainer._set_lr

    def set_lr(self):  # called once per step, before the forward
        if self.step == warm:
            prof.start()
            marks["t0"] = time.perf_counter()
        if self.step == warm + steps:
            marks["t1"] = time.perf_counter()
            prof.stop()
        return original(self)

    T.Trainer._set_lr = set_lr
    try:
        with tempfile.TemporaryDirectory() as tmp:
            T.train_run(spec, Path(tmp) / "run", progress=False)
    finally:
        T.Trainer._set_lr = original
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU]
    total = sum(e.self_cpu_time_total for e in events)
    shares: Counter = Counter()
    for e in events:
        shares[categorize(e.key)] += e.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    return {"steps": steps, "batch": spec.train.batch_size, "step_ms_profiled": (marks["t1"] - marks["t0"]) / steps * 1e3,
            "self_ms_per_step": total / steps / 1e3, "operators_per_step": sum(e.count for e in events) / steps,
            "ms_per_step": {k: v / steps / 1e3 for k, v in shares.most_common()},
            "top": [{"op": e.key, "ms_per_step": e.self_cpu_time_total / steps / 1e3, "calls_per_step": e.count / steps}
                    for e in top]}


def _best_us(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def matmul_rates() -> dict:
    import torch

    from dimr_lab.nn.network import build_model
    from dimr_lab.spec.run_spec import load_run_spec

    spec = load_run_spec(None, [])
    model = build_model(spec.model)
    shapes: Counter = Counter()

    def hook(mod, inputs, _out):
        x = inputs[0]
        shapes[(x.numel() // x.shape[-1], mod.in_features, mod.out_features)] += 1

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(hook)
    B, res = spec.train.batch_size, spec.model.image_size
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model(torch.randn(B, spec.model.in_channels, res, res, generator=g), torch.rand(B, generator=g),
              torch.randint(0, spec.model.num_classes, (B,), generator=g))
    rows, flop_total, us_total = [], 0.0, 0.0
    for (n, i, o), count in sorted(shapes.items()):
        X, W, G = torch.randn(n, i), torch.randn(o, i), torch.randn(n, o)
        b = torch.randn(o)
        times = {"forward": _best_us(lambda: torch.addmm(b, X, W.t())), "grad_input": _best_us(lambda: G @ W),
                 "grad_weight": _best_us(lambda: G.t() @ X)}
        flops = 2 * n * i * o
        rows.append({"rows": n, "in": i, "out": o, "layers": count,
                     **{f"{k}_gflops": flops / v / 1e3 for k, v in times.items()}})
        flop_total += 3 * flops * count
        us_total += sum(times.values()) * count
    square = {}
    for n in (256, 1024, 2048):
        A, Bm = torch.randn(n, n), torch.randn(n, n)
        square[n] = 2 * n ** 3 / _best_us(lambda: A @ Bm, n=3 if n > 1024 else 10) / 1e3
    return {"layers": rows, "linear_ms_per_step": us_total / 1e3, "linear_gflops": flop_total / us_total / 1e3,
            "square_gflops": square}


def autocast_step() -> dict:
    from dimr_lab.bench import bench
    from dimr_lab.spec.run_spec import load_run_spec

    spec = load_run_spec(None, [])
    out = {}
    for dtype in ("float32", "bfloat16", "float32", "bfloat16"):  # alternating, the best of two each
        r = bench(spec.model, batch=spec.train.batch_size, dtype=dtype, steps=10, warmup=3)
        out[dtype] = min(out.get(dtype, float("inf")), r["train_step_s"] * 1e3)
    return {"train_step_ms": out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "torch": torch.__version__, "profile": profile_training(args.steps),
              "matmul": matmul_rates(), "autocast": autocast_step()}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    p, m, a = result["profile"], result["matmul"], result["autocast"]
    print(f"training step, {args.threads} thread(s), batch {p['batch']}: {p['step_ms_profiled']:.1f} ms under the "
          f"profiler, {p['self_ms_per_step']:.1f} ms of operator self time, {p['operators_per_step']:.0f} operators")
    for k, v in p["ms_per_step"].items():
        print(f"  {k:15s} {v:6.1f} ms  {v / p['self_ms_per_step']:5.1%}")
    print("top operators:")
    for t in p["top"]:
        print(f"  {t['op'][:48]:48s} {t['ms_per_step']:6.2f} ms  {t['calls_per_step']:6.1f} calls")
    print("linear layers at the default batch (GFLOP/s of forward, input gradient, weight gradient):")
    for r in m["layers"]:
        print(f"  {r['rows']:6d} x {r['in']:4d} -> {r['out']:4d} (x{r['layers']:2d}): {r['forward_gflops']:6.1f} "
              f"{r['grad_input_gflops']:6.1f} {r['grad_weight_gflops']:6.1f}")
    print(f"  all linear matmuls of a step: {m['linear_ms_per_step']:.1f} ms at {m['linear_gflops']:.1f} GFLOP/s; "
          "square matmuls: " + ", ".join(f"{n}: {g:.1f}" for n, g in m["square_gflops"].items()) + " GFLOP/s")
    ms = a["train_step_ms"]
    print(f"training step (dimr-lab bench's): float32 {ms['float32']:.1f} ms, bfloat16 autocast "
          f"{ms['bfloat16']:.1f} ms ({ms['float32'] / ms['bfloat16']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
