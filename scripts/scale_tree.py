"""A large results tree for timing the commands that read one: every ablation under results/ planned with
more seeds (`run ... --seeds`), each planned folder a copy of the committed run of its variant with the
seed `seed % 6`, its run.json and spec.json rewritten for its own seed and identity. The numbers repeat;
only the sizes matter.

    .venv/bin/python scripts/scale_tree.py /tmp/scale/tree --seeds 30     # 20 variants x 30 seeds: 600 runs
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from dimr_lab.errors import UserError
from dimr_lab.rundir import RunDir, RunRecord
from dimr_lab.runner.plan import expand
from dimr_lab.spec.ablation import load_ablation

ABLATIONS = ("table2_components", "tdln_vs_adaln", "branches", "branch_blocks", "patch_size")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--source", type=Path, default=Path(__file__).resolve().parent.parent)
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out}: exists")
    made = 0
    for name in ABLATIONS:
        committed = {(r.variant, r.seed, tuple(sorted(r.grid.items()))): p for p in
                     (args.source / "results" / name).iterdir() if (r := _record(p)) is not None}
        abl = load_ablation(args.source / "ablations" / f"{name}.toml")
        for run in expand(abl, "small", results=args.out, seeds=list(range(args.seeds))):
            src = committed[(run.variant, run.seed % 6, tuple(sorted(run.grid.items())))]
            shutil.copytree(src, run.run_dir)
            folder = RunDir(run.run_dir)
            record = run.record("local")
            folder.write_record(record)
            folder.write_spec_document(record.spec, run.identity)
            made += 1
    print(f"{made} runs under {args.out}")


def _record(path: Path) -> RunRecord | None:
    try:
        return RunDir(path).read_record() if path.is_dir() else None
    except UserError:  # curves.png and the like
        return None


if __name__ == "__main__":
    main()
