"""The package's layers: who may import whom, and what works without torch.

    errors, atomic, registry, catalog, spec, rundir, provenance, images, dist, stats   (base; no torch but dist)
      < nn, diffusion, data            (siblings: none imports another)
      < eval < train < runner, bench < table, cli
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dimr_lab"

LAYERS = [
    {"errors", "atomic", "registry", "catalog", "spec", "rundir", "provenance", "images", "dist", "stats"},
    {"nn", "diffusion", "data"},
    {"eval"},
    {"train"},
    {"runner", "bench"},
    {"table", "cli", "__main__"},
]
TORCH_FREE = {"errors", "atomic", "registry", "catalog", "spec", "rundir", "provenance", "images", "stats", "table"}


def unit(module: str) -> str | None:
    """'dimr_lab.spec.run_spec' -> 'spec'; the package root itself -> None (it holds only __version__ and
    lazy conveniences)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "dimr_lab" else None


def layer(name: str) -> int:
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"dimr_lab.{name} is in no layer: add it to LAYERS")


def imports(path: Path) -> list[tuple[str, int]]:
    """Every module imported anywhere in the file (functions too), with its line."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, node.lineno))
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            here = path.relative_to(ROOT).with_suffix("").parts[:-node.level]
            base = ".".join(here) + (f".{node.module}" if node.module else "")
            out.append((base, node.lineno))
    return out


FILES = sorted(p for p in PKG.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PKG)) for p in FILES])
def test_no_lower_layer_imports_a_higher_one(path):
    rel = path.relative_to(PKG)
    me = rel.parts[0].removesuffix(".py")
    if me == "__init__":
        return
    mine = layer(me)
    for module, line in imports(path):
        other = unit(module)
        if other is None or other == me or not (PKG / other).exists() and not (PKG / f"{other}.py").exists():
            continue
        theirs = layer(other)
        assert theirs <= mine, f"dimr_lab/{rel}:{line} imports {module}: layer {theirs} from layer {mine}"
        if mine == theirs == 1:
            raise AssertionError(f"dimr_lab/{rel}:{line} imports its sibling {module}")
        if me in TORCH_FREE:
            assert module.split(".")[0] != "torch", f"dimr_lab/{rel}:{line} imports torch"
    if me in TORCH_FREE:
        assert not any(m.split(".")[0] == "torch" for m, _ in imports(path)), f"dimr_lab/{rel} imports torch"


# standard-library modules newer than the oldest Python a package may declare, with the version that added them
NEW_STDLIB = {"tomllib": (3, 11)}


def test_requires_python_admits_no_interpreter_without_a_standard_module_the_package_imports():
    import re
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    found = re.fullmatch(r">=\s*(\d+)\.(\d+)", declared.strip())
    assert found, f"pyproject.toml: requires-python {declared!r}: expected >=X.Y"
    oldest = (int(found[1]), int(found[2]))
    for path in FILES:
        for module, line in imports(path):
            needs = NEW_STDLIB.get(module.split(".")[0])
            assert needs is None or needs <= oldest, (
                f"dimr_lab/{path.relative_to(PKG)}:{line} imports {module} (Python {needs[0]}.{needs[1]}+) "
                f"but pyproject.toml declares requires-python {declared!r}")


# import name -> distribution name where they differ; what is declared but never imported, and why
DISTRIBUTION = {"PIL": "pillow", "sklearn": "scikit-learn", "torch_fidelity": "torch-fidelity"}
DECLARED_FOR_OTHERS = {"torchvision": "timm and torch-fidelity import it"}


def test_pyproject_declares_what_the_package_imports_and_nothing_it_does_not():
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda req: re.match(r"[A-Za-z0-9_.-]+", req)[0].lower()  # noqa: E731
    runtime = {name(r) for r in project["dependencies"]}
    extras = {name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    imported: dict[str, str] = {}
    for path in FILES:
        for module, line in imports(path):
            top = module.split(".")[0]
            if top != "dimr_lab" and top not in sys.stdlib_module_names and top != "click":  # click: typer's
                imported.setdefault(DISTRIBUTION.get(top, top).replace("_", "-").lower(),
                                    f"dimr_lab/{path.relative_to(PKG)}:{line}")
    for dist, where in imported.items():
        assert dist in runtime | extras, f"{where} imports {dist}, which pyproject.toml does not declare"
    for dist in runtime - set(imported) - set(DECLARED_FOR_OTHERS):
        raise AssertionError(f"pyproject.toml: {dist} is a dependency that nothing in dimr_lab imports")


BLOCK_TORCH = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, Refuse())
"""


def test_the_spec_layer_validates_every_ablation_without_torch():
    code = BLOCK_TORCH + """
from pathlib import Path
from dimr_lab.runner.plan import expand
from dimr_lab.spec.ablation import load_ablation
from dimr_lab.spec.counts import lookup
from dimr_lab.registry import KINDS
n = 0
for path in sorted(Path("ablations").glob("*.toml")):
    abl = load_ablation(path)
    for profile in abl.profile_names():
        for run in expand(abl, profile, results="/tmp/dimr-lab-layers", seeds=[0]):
            assert lookup(run.spec.model) is not None, (path, run.variant)  # counted, shipped
            n += 1
assert sum(len(r.names()) for r in KINDS.values()) > 30
assert "torch" not in sys.modules
print(n)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.split()[-1]) > 20


@pytest.mark.parametrize("argv", [["components"], ["components", "sampler"], ["keys"], ["keys", "model", "--json"],
                                  ["describe", "dimr_xl_2r", "--json"],
                                  ["run", "ablations/tdln_vs_adaln.toml", "--dry-run"],
                                  ["run", "ablations/table2_components.toml", "--profile", "paper", "--dry-run",
                                   "--json"], ["--help"]])
def test_commands_that_need_no_torch_run_without_it(argv, tmp_path):
    code = BLOCK_TORCH + f"""
from dimr_lab.cli import main
try:
    main({argv!r} + (["--results", {str(tmp_path)!r}] if {argv!r}[0] == "run" else []))
except SystemExit as e:
    assert not e.code, e.code
assert "torch" not in sys.modules
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DIMR_LAB_CACHE": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert not list(tmp_path.glob("*/*")), "a dry run writes nothing"


def test_a_paper_dry_run_counts_each_distinct_network_once(tmp_path, monkeypatch, capsys):
    import json

    import dimr_lab.spec.counts as counts
    from conftest import cli
    from dimr_lab.spec.ablation import load_ablation

    calls = []
    real = counts.lookup
    monkeypatch.setattr(counts, "lookup", lambda model: calls.append(counts.model_key(model)) or real(model))
    path = ROOT / "ablations" / "table2_components.toml"
    code, out, err = cli(["run", path, "--profile", "paper", "--dry-run", "--json", "--results", tmp_path], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines() if '"run_dir"' in line]
    assert len(rows) == 6 * len(load_ablation(path).seeds)  # six variants
    networks = {r["network"] for r in rows}
    assert len(calls) == len(networks) == len(set(calls)) < len(rows)
