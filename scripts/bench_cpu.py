"""CPU training throughput of the built-in default run, side by side: this tree against another checkout.

    .venv/bin/python scripts/bench_cpu.py --baseline /tmp/base [--also /tmp/prev] [--steps 120] [--repeats 3] [--compile]

Each measurement is a fresh `dimr-lab train` of the default spec (evaluation off) in a subprocess importing
the tree under test; trees alternate within every repeat, so both see the same machine state. Modes:
  1 thread       OMP_NUM_THREADS=1, the machine otherwise idle
  2 threads      OMP_NUM_THREADS=2
  default        no thread setting (the tree's own default)
  jobs           two 1-thread runs at once (what `run --jobs 0` does on 2 cores): their summed images/s
  default+busy   the default beside a second, busy 1-thread training process
`--also` adds more checkouts (say, the commit before a change), measured beside the others in the same
repeats and reported against the baseline like this tree. With --compile, this tree is measured a second
time with train.compile = true (each block compiled): the training rate leaves the
compilation out, the CPU-second rate of 1-thread runs counts it (with inductor's cache as the machine has
it: cold on the first compiled run, warm after).
Reported: the median over repeats of the training images/s (log.jsonl rows after the first), and for
1-thread runs the CPU-time rate (images per CPU-second), which waiting for a core does not change.
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

HERE = Path(__file__).resolve().parents[1]
PY = sys.executable
CODE = "from dimr_lab.cli import main; main()"


def train_cmd(out: Path, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    sets = [x for kv in extra for x in ("--set", kv)]
    return [PY, "-c", CODE, "train", "--out", str(out), "--set", f"train.steps={steps}", "--set",
            "eval.enabled=false", "--set", "train.log_every=20", "--set", "train.checkpoint_every=100000",
            "--no-progress", *sets]


def env_for(tree: Path, threads: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(tree)
    env.setdefault("DIMR_LAB_CACHE", str(Path(tempfile.gettempdir()) / "dimr-lab-bench-cache"))
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def rate(out: Path) -> float:
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()][1:]
    return statistics.median(r["images_per_s"] for r in rows)


def one(tree: Path, threads: int | None, steps: int, tmp: Path, extra: tuple[str, ...] = ()) -> tuple[float, float]:
    """(images/s, images per CPU-second) of one run."""
    out = tmp / f"run-{time.monotonic_ns()}"
    t0 = os.times()
    subprocess.run(train_cmd(out, steps, extra), env=env_for(tree, threads), cwd=tree, check=True, capture_output=True)
    t1 = os.times()
    cpu = (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)
    return rate(out), 32 * steps / cpu


def jobs(tree: Path, steps: int, tmp: Path, extra: tuple[str, ...] = ()) -> float:
    outs = [tmp / f"job{i}-{time.monotonic_ns()}" for i in range(2)]
    procs = [subprocess.Popen(train_cmd(o, steps, extra), env=env_for(tree, 1), cwd=tree, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for o in outs]
    for p in procs:
        p.wait()
    return sum(rate(o) for o in outs)


def beside_busy(tree: Path, steps: int, tmp: Path, extra: tuple[str, ...] = ()) -> float:
    busy = subprocess.Popen(train_cmd(tmp / f"busy-{time.monotonic_ns()}", 10**6), env=env_for(tree, 1), cwd=tree,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(8)  # the busy run is past its start-up
        return one(tree, None, steps, tmp, extra)[0]
    finally:
        busy.kill()
        busy.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, required=True, help="another checkout of dimr-lab (e.g. a git worktree)")
    p.add_argument("--also", type=Path, action="append", default=[],
                   help="another checkout measured beside (repeatable), e.g. the commit before a change")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="1,2,default,jobs,busy")
    p.add_argument("--compile", action="store_true", help="also this tree with train.compile = true")
    args = p.parse_args()
    trees = {"baseline": (args.baseline.resolve(), ())}
    for path in args.also:
        name = path.resolve().name
        if name in trees or name.startswith("this"):
            p.error(f"--also {path}: its folder name {name!r} is taken; name the checkouts apart")
        trees[name] = (path.resolve(), ())
    trees["this"] = (HERE, ())
    if args.compile:
        trees["this, compiled"] = (HERE, ("train.compile=true",))
    modes = args.modes.split(",")
    res: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        for rep in range(args.repeats):
            for mode in modes:
                for name, (tree, extra) in (list(trees.items()) if rep % 2 == 0 else list(trees.items())[::-1]):
                    if mode in ("1", "2", "default"):
                        ips, cpu = one(tree, None if mode == "default" else int(mode), args.steps, tmp, extra)
                        res.setdefault((mode, name), []).append(ips)
                        if mode == "1":
                            res.setdefault(("1 (per CPU-s)", name), []).append(cpu)
                    elif mode == "jobs":
                        res.setdefault((mode, name), []).append(jobs(tree, args.steps, tmp, extra))
                    elif mode == "busy":
                        res.setdefault(("default beside a busy run", name), []).append(beside_busy(tree, args.steps, tmp, extra))
                    print(f"repeat {rep} {mode} {name}: {res[(mode if mode != 'busy' else 'default beside a busy run', name)][-1]:.0f}",
                          file=sys.stderr, flush=True)
    load = os.getloadavg()
    others = [n for n in trees if n != "baseline"]
    print("| mode | baseline img/s | " + " | ".join(f"{n} img/s | ratio" for n in others) + " |")
    print("|---|---|" + "---|---|" * len(others))
    for mode in dict.fromkeys(m for m, _ in res):
        b = statistics.median(res[(mode, "baseline")])
        cells = [f"{statistics.median(res[(mode, n)]):.0f} | {statistics.median(res[(mode, n)]) / b:.2f}x"
                 for n in others]
        print(f"| {mode} | {b:.0f} | " + " | ".join(cells) + " |")
    print(f"\nmedians of {args.repeats} repeats, {args.steps} steps each; load average at the end {load[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
