"""Shared test settings: small thread counts (CI has 2 cores) and deterministic torch."""

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config):
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def cli(argv, capsys):
    """Run `dimr-lab ARGV` in-process: (exit status, stdout, stderr)."""
    from dimr_lab.cli import main

    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def opens_and_modules(code: str, root) -> tuple[dict[str, int], set[str]]:
    """Run Python `code` in a fresh interpreter: (how many times it opened each file under `root`, by path
    relative to root; the top-level names of the modules it imported). Every open() counts, whoever makes it."""
    import json
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    root = str(Path(root).resolve())
    script = textwrap.dedent(f"""
        import collections, json, sys
        ROOT = {root!r} + "/"
        opened = collections.Counter()

        def hook(event, args):
            if event == "open" and isinstance(args[0], str) and args[0].startswith(ROOT):
                opened[args[0][len(ROOT):]] += 1

        sys.addaudithook(hook)
    """) + textwrap.dedent(code) + textwrap.dedent("""
        print(json.dumps({"opened": opened, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return found["opened"], set(found["modules"])


def module_from_file(path, name: str):
    """The Python file at `path` imported as a module named `name` (released code, the project's scripts/)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def script_module(name: str):
    """scripts/<name>.py of this project as a module."""
    from pathlib import Path

    return module_from_file(Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py", name)


def released_module(env: str, filename: str, what: str, repo: str):
    """A single-file module of released code from the checkout $env names (README, Testing), or a skip that
    says how to provide it."""
    from pathlib import Path

    import pytest

    src = os.environ.get(env)
    if not src:
        pytest.skip(f"{what} is not available: set {env} to a checkout of github.com/{repo} (README, Testing)")
    path = Path(src) / filename
    if not path.is_file():
        pytest.skip(f"{env}={src} has no {filename}")
    return module_from_file(path, f"released_{Path(filename).stem}")


@pytest.fixture(scope="session")
def classifier_store(tmp_path_factory):
    """The session's folder of the evaluation classifiers trained by tests that use it (`classifier_cache`)."""
    return tmp_path_factory.mktemp("classifier-store")


def classifiers_from_store(store, cache) -> None:
    """Copy the session store's trained classifiers into the cache folder `cache` (made if missing)."""
    import shutil
    from pathlib import Path

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    for p in Path(store).glob("classifier-*.pt"):
        if not (cache / p.name).exists():
            shutil.copy2(p, cache / p.name)


def classifiers_to_store(cache, store) -> None:
    """Keep the classifiers trained into `cache` that the session store lacks."""
    import shutil
    from pathlib import Path

    for p in Path(cache).glob("classifier-*.pt"):
        if not (Path(store) / p.name).exists():
            part = Path(store) / f".{p.name}.part"
            shutil.copy2(p, part)
            part.replace(Path(store) / p.name)


@pytest.fixture
def classifier_cache(classifier_store, tmp_path, monkeypatch):
    """$DIMR_LAB_CACHE set to tmp_path/cache, holding the classifiers earlier tests using the store trained (a
    classifier is named by its data and recipe: the file such a test would train again); one this test trains
    is kept for the later ones. The session's first test trains its own, from an empty cache. For tests that
    use a classifier, not for tests of its training or its cache files."""
    cache = tmp_path / "cache"
    classifiers_from_store(classifier_store, cache)
    monkeypatch.setenv("DIMR_LAB_CACHE", str(cache))
    yield cache
    classifiers_to_store(cache, classifier_store)


def tiny_evaluated_ablation(name: str, seeds: str = "[0]", variants: str = '[[variant]]\nname = "a"\n') -> str:
    """An ablation file's text whose runs train two steps of a tiny two-branch network and evaluate 8 samples
    by sample accuracy: for tests of what runs and evaluations do, in seconds."""
    return f"""
[ablation]
name = "{name}"
seeds = {seeds}
[base]
"model.preset" = "dimr_tiny_2r"
"model.branches" = [{{ width = 16, depth = 1, heads = 2 }}, {{ width = 8, depth = 1 }}]
"data.train_size" = 64
"train.steps" = 2
"train.batch_size" = 8
"sample.steps" = 2
"sample.grid_size" = 2
"eval.samples" = 8
"eval.batch_size" = 8
"eval.metrics" = ["sample_accuracy"]
{variants}"""
