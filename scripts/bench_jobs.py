#!/usr/bin/env python
"""Training throughput of the local runner's two ways to use a machine's cores, side by side:

    one run using every core's thread   vs   one single-threaded run per core, all at once

    python scripts/bench_jobs.py [--steps 300] [--repeats 2] [--set train.batch_size=32 ...]

Each configuration trains the built-in default spec (plus --set overrides) for --steps steps in fresh
processes, with evaluation off; images/s is read from each run's own log (training steps only), and the
parallel configuration's total is the sum over its runs. The two configurations alternate --repeats times.
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
from pathlib import Path


def train(out: Path, threads: int, steps: int, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    sets = [f"train.steps={steps}", "eval.enabled=false", f"train.checkpoint_every={steps}",
            "train.log_every=25", "sample.grid_size=8", *overrides]
    cmd = [sys.executable, "-m", "dimr_lab", "train", "--out", str(out), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def images_per_s(out: Path) -> float:
    """Mean images/s of the logged windows after the first (start-up)."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r][1:]
    return statistics.mean(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2)
    from dimr_lab.runner.local import usable_cores

    p.add_argument("--cores", type=int, default=usable_cores())
    p.add_argument("--set", dest="sets", action="append", default=[])
    args = p.parse_args()
    results: dict[str, list[float]] = {"one run, all threads": [], "one run per core, 1 thread each": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            t = time.time()
            out = Path(tmp) / f"one{r}"
            proc = train(out, args.cores, args.steps, args.sets)
            if proc.wait():
                sys.exit(f"error: training failed:\n{proc.stderr.read()[-2000:]}")
            results["one run, all threads"].append(images_per_s(out))
            outs = [Path(tmp) / f"par{r}-{j}" for j in range(args.cores)]
            procs = [train(o, 1, args.steps, args.sets) for o in outs]
            for proc in procs:
                if proc.wait():
                    sys.exit(f"error: training failed:\n{proc.stderr.read()[-2000:]}")
            results["one run per core, 1 thread each"].append(sum(images_per_s(o) for o in outs))
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in results.items())
                  + f" ({time.time() - t:.0f} s)", flush=True)
    base = statistics.median(results["one run, all threads"])
    print(f"\n{args.cores} cores, default spec {' '.join(args.sets)}, {args.steps} steps, medians of "
          f"{args.repeats}\n")
    print("| configuration | images/s (all runs) | vs one run |")
    print("|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {statistics.median(v):.0f} | {statistics.median(v) / base:.2f}x |")


if __name__ == "__main__":
    main()
