"""Wall time and peak memory of the commands that read a large results tree, for this checkout and optionally
another (a `git archive` of an older commit's dimr_lab/), alternating within each repeat; medians.

    .venv/bin/python scripts/scale_tree.py /tmp/scale/tree --seeds 30
    .venv/bin/python scripts/bench_scale.py /tmp/scale/tree --baseline /tmp/scale/base --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
NEUTRAL = "/"


def commands(tree: Path, seeds: int) -> list[list[str]]:
    every = ",".join(str(s) for s in range(seeds))
    return [["--help"], ["status", "--help"], ["table", str(tree)], ["table", str(tree), "--steps"],
            ["table", str(tree), "--format", "csv"],
            ["table", str(tree), "--curves", f"{tempfile.gettempdir()}/bench-scale-curves.png", "--force"],
            ["status", str(tree)], ["status", str(tree), "--json"],
            ["run", str(HERE / "ablations" / "table2_components.toml"), "--profile", "small", "--dry-run",
             "--results", str(tree), "--seeds", every]]


def measure(package_root: Path, argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak resident KB) of `python -m dimr_lab ARGV` with package_root first on the path."""
    env = {**os.environ, "PYTHONPATH": str(package_root), "OMP_NUM_THREADS": "1"}
    # from a neutral folder: `python -m` puts the working folder on the path ahead of PYTHONPATH
    done = subprocess.run(["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "dimr_lab", *argv], env=env,
                          cwd=NEUTRAL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{argv}: exit {done.returncode}: {done.stderr[-500:]}")
    wall, kb = done.stderr.strip().splitlines()[-1].split()
    return float(wall), int(kb)


def torch_at_help(package_root: Path) -> bool:
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    err = subprocess.run([sys.executable, "-X", "importtime", "-m", "dimr_lab", "--help"], env=env, cwd=NEUTRAL,
                         capture_output=True, text=True).stderr
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in err.splitlines())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("tree", type=Path)
    ap.add_argument("--baseline", type=Path, help="a package root (holding dimr_lab/) to compare with")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=30, help="the seeds scale_tree.py planned")
    args = ap.parse_args()
    tree = args.tree.resolve()
    trees = {"this": HERE} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    runs = sum(1 for _ in tree.glob("*/*/run.json"))
    print(f"{runs} runs under {tree}; load average {os.getloadavg()[0]:.2f} at the start")
    for name, root in trees.items():
        print(f"{name}: `dimr-lab --help` imports torch: {torch_at_help(root)}")
    print("| command | " + " | ".join(f"{n} s | {n} MB" for n in trees) + " |")
    print("|---|" + "---|---|" * len(trees))
    for argv in commands(tree, args.seeds):
        got: dict[str, list[tuple[float, int]]] = {n: [] for n in trees}
        for _ in range(args.repeats):
            for name, root in trees.items():
                got[name].append(measure(root, argv))
        shown = " ".join(argv).replace(str(tree), "TREE").replace(str(HERE) + "/", "")
        shown = shown.replace(tempfile.gettempdir() + "/", "")
        shown = shown.replace(",".join(map(str, range(args.seeds))), f"0,...,{args.seeds - 1}")
        cells = [f"{statistics.median(w for w, _ in v):.2f} | {max(k for _, k in v) / 1024:.0f}" for v in got.values()]
        print(f"| `{shown}` | " + " | ".join(cells) + " |")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
