"""Count every preset and every network of the ablation files once, into dimr_lab/spec/counts.json.

    .venv/bin/python scripts/update_counts.py          # rewrite the table
    .venv/bin/python scripts/update_counts.py --check  # exit 1 if an entry is missing or differs

`describe`, `run --dry-run` and the trainer look counts up there (no torch, no counting); a network that
is not in the table is counted on first use and remembered in the user's cache. tests/test_counts.py
recounts the entries.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def networks() -> dict[str, object]:
    """model key -> ModelSpec for every preset and every network an ablation file can plan."""
    from dimr_lab.runner.plan import expand
    from dimr_lab.spec.ablation import load_ablation
    from dimr_lab.spec.counts import model_key
    from dimr_lab.spec.model_spec import resolve_model
    from dimr_lab.spec.presets import PRESETS

    found = {}
    for name in PRESETS:
        spec = resolve_model(name)
        found[model_key(spec)] = spec
    for path in sorted((ROOT / "ablations").glob("*.toml")):
        abl = load_ablation(path)
        for profile in abl.profile_names():
            for run in expand(abl, profile, results="/tmp/dimr-lab-counts", seeds=[0]):
                found[model_key(run.spec.model)] = run.spec.model
    return found


def main() -> int:
    from dimr_lab.nn.describe import count
    from dimr_lab.spec.counts import FIELDS

    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true", help="compare with the shipped table instead of writing it")
    args = p.parse_args()
    path = ROOT / "dimr_lab" / "spec" / "counts.json"
    table = {key: {k: v for k, v in count(spec).items() if k in FIELDS} for key, spec in networks().items()}
    if args.check:
        shipped = json.loads(path.read_text())
        bad = sorted(k for k in table if shipped.get(k) != table[k])
        print(f"{len(table)} networks, {len(bad)} missing or different" + (f": {bad}" if bad else ""))
        return 1 if bad else 0
    from dimr_lab.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True) + "\n")  # a killed rewrite leaves the old
    print(f"wrote {len(table)} networks to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
