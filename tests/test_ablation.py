"""Ablation files: plan expansion, naming, hashing, the shipped norm ablation, dry runs, malformed input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dimr_lab.errors import SpecError
from dimr_lab.runner.plan import expand, split_overrides
from dimr_lab.spec.slurm import slurm_settings
from dimr_lab.spec.ablation import load_ablation
from dimr_lab.spec.run_spec import load_run_spec
from dimr_lab.spec.schema import to_dict
from conftest import cli

REPO = Path(__file__).resolve().parents[1]
NORM_ABLATION = REPO / "ablations" / "tdln_vs_adaln.toml"

GOOD = """
[ablation]
name = "study"
title = "a study"
seeds = [0, 1]
paper = { table = "table2_ablation_imagenet64", rows = { a = 3, b = 4 } }

[base]
"model.preset" = "dimr_tiny_3r"
"train.steps" = 5
"eval.enabled" = false

[[variant]]
name = "a"
factors = { norm = "TD-RMSNorm" }

[[variant]]
name = "b"
factors = { norm = "TD-LN" }
"model.norm" = "tdln"

[grid]
"train.lr" = [1e-3, 3e-4]

[profile.tiny]
"train.batch_size" = 8

[profile.paper]
"train.batch_size" = 1024
"model.norm" = "rmsnorm"
"slurm.gpus_per_node" = 8
"""


def write(tmp: Path, text: str, name: str = "abl.toml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def test_expand_variants_grid_seeds(tmp_path):
    abl = load_ablation(write(tmp_path, GOOD))
    runs = expand(abl, "tiny", results=tmp_path / "results")
    assert len(runs) == 2 * 2 * 2
    assert [(r.variant, r.grid["train.lr"], r.seed) for r in runs][:4] == [
        ("a", 1e-3, 0), ("a", 1e-3, 1), ("a", 3e-4, 0), ("a", 3e-4, 1)]
    for r in runs:
        assert r.spec.train.seed == r.seed
        assert r.spec.train.batch_size == 8
        assert r.spec.train.lr == r.grid["train.lr"]
        assert r.run_dir.parent == (tmp_path / "results" / "study").resolve()
        assert re.fullmatch(rf"{r.variant}-s{r.seed}-[0-9a-f]{{8}}", r.run_dir.name)
        assert r.identity == r.spec.identity_hash()
        assert r.paper == {"table": "table2_ablation_imagenet64", "row": 3 if r.variant == "a" else 4}
    assert runs[0].spec.model.norm == "tdrmsnorm" and runs[4].spec.model.norm == "tdln"
    assert len({r.run_dir for r in runs}) == 8
    # the stored spec resolves to the same identity (the worker re-reads it from run.json)
    info = runs[5].record().to_json()
    assert load_run_spec(json.loads(json.dumps(info["spec"]))).identity_hash() == runs[5].identity


def test_override_order_and_profiles(tmp_path):
    abl = load_ablation(write(tmp_path, GOOD))
    paper = expand(abl, "paper", results=tmp_path)
    # variant beats profile: b sets tdln, a inherits the profile's rmsnorm
    assert {r.variant: r.spec.model.norm for r in paper} == {"a": "rmsnorm", "b": "tdln"}
    assert all(r.profile == "paper" and r.spec.train.batch_size == 1024 for r in paper)
    # --set beats everything but the seed
    run, slurm, seeds = split_overrides([("train.batch_size", 4), ("slurm.partition", "gpu"),
                                         ("ablation.seeds", [7])])
    runs = expand(abl, "tiny", run, results=tmp_path, seeds=seeds)
    assert all(r.spec.train.batch_size == 4 and r.seed == 7 for r in runs) and len(runs) == 4
    s = slurm_settings(abl, "paper", slurm)
    assert s.partition == "gpu" and s.gpus_per_node == 8
    assert s.tasks() == 8  # tasks_per_node not given: one process per GPU
    assert slurm_settings(abl, "tiny", {}).gpus_per_node == 0 and slurm_settings(abl, "tiny", {}).tasks() == 1


def test_folder_names_follow_what_a_run_trains(tmp_path):
    a1 = expand(load_ablation(write(tmp_path, GOOD)), results=tmp_path)
    a2 = expand(load_ablation(write(tmp_path, GOOD)), results=tmp_path)
    assert [r.run_dir for r in a1] == [r.run_dir for r in a2]
    changed = expand(load_ablation(write(tmp_path, GOOD.replace('"model.norm" = "tdln"', '"model.norm" = "rmsnorm"'))),
                     results=tmp_path)
    assert {r.run_dir for r in a1 if r.variant == "a"} == {r.run_dir for r in changed if r.variant == "a"}
    assert not {r.run_dir for r in a1 if r.variant == "b"} & {r.run_dir for r in changed if r.variant == "b"}
    # more steps (warm-up then constant), other evaluation or logging settings: the same run, continued
    for old, new in (('"train.steps" = 5', '"train.steps" = 6'), ('"eval.enabled" = false', '"eval.samples" = 512'),
                     ('"train.steps" = 5', '"train.steps" = 5\n"train.log_every" = 7')):
        same = expand(load_ablation(write(tmp_path, GOOD.replace(old, new))), results=tmp_path)
        assert [r.run_dir for r in same] == [r.run_dir for r in a1], (old, new)
    # a schedule that decays over the total makes the steps part of the identity
    cosine = GOOD.replace('"train.steps" = 5', '"train.steps" = 5\n"train.lr_schedule" = "cosine"')
    c5 = expand(load_ablation(write(tmp_path, cosine)), results=tmp_path)
    c6 = expand(load_ablation(write(tmp_path, cosine.replace('"train.steps" = 5', '"train.steps" = 6'))),
                results=tmp_path)
    assert not {r.run_dir for r in c5} & {r.run_dir for r in c6}
    # a label (factor) is not part of the spec: same folders
    relabelled = expand(load_ablation(write(tmp_path, GOOD.replace('"TD-LN"', '"TDLN"'))), results=tmp_path)
    assert [r.run_dir for r in relabelled] == [r.run_dir for r in a1]


def test_base_from_file_and_builtin(tmp_path):
    (tmp_path / "specs").mkdir()
    write(tmp_path / "specs", '[model]\npreset = "dimr_tiny_2r"\n[train]\nsteps = 11\n', "base.toml")
    text = GOOD.replace('[base]\n"model.preset" = "dimr_tiny_3r"', '[base]\nspec = "specs/base.toml"')
    runs = expand(load_ablation(write(tmp_path, text)), results=tmp_path)
    assert runs[0].spec.train.steps == 5 and len(runs[0].spec.model.branches) == 2
    text = GOOD.replace('[base]\n"model.preset" = "dimr_tiny_3r"', '[base]\nspec = "default"')
    from dimr_lab.spec.defaults import DEFAULT_RUN

    runs = expand(load_ablation(write(tmp_path, text)), results=tmp_path)
    assert runs[0].spec.train.ema_decay == DEFAULT_RUN["train"]["ema_decay"]  # from the built-in run
    assert runs[0].spec.data.image_size == runs[0].spec.model.image_size  # follows the default model


def test_norm_ablation_file():
    abl = load_ablation(NORM_ABLATION)
    assert abl.name == "tdln_vs_adaln" and abl.seeds == [0, 1, 2]
    names = [v.name for v in abl.variants]
    assert names == ["tdln", "adaln_zero", "adaln", "ln_time_token", "tdrmsnorm"]
    assert abl.paper_table == "table2_ablation_imagenet64" and abl.paper_rows == {"tdln": 4, "adaln_zero": 3}
    tiny = expand(abl, "tiny", results="results")
    assert len(tiny) == 15
    by = {r.variant: to_dict(r.spec.model) for r in tiny}
    assert (by["tdln"]["conditioning"], by["tdln"]["norm"], by["tdln"]["outer_norm"]) == ("norm", "tdln", "tdln")
    assert (by["adaln_zero"]["conditioning"], by["adaln_zero"]["norm"]) == ("adaln", "adaln_zero")
    assert by["ln_time_token"]["conditioning"] == "token" and by["ln_time_token"]["norm"] == "layernorm"
    assert by["tdrmsnorm"]["norm"] == "tdrmsnorm"
    # all else fixed: only the norm keys differ between variants
    keys = {"conditioning", "norm", "outer_norm"}
    strip = [{k: v for k, v in m.items() if k not in keys} for m in by.values()]
    assert all(s == strip[0] for s in strip)
    assert tiny[0].spec.data.name == "shapes" and tiny[0].spec.model.name == "DiMR-tiny/3R"
    paper = expand(abl, "paper", results="results")
    p = paper[0].spec
    assert p.model.name == "DiMR-M/3R" and p.data.name == "folder" and p.data.image_size == 64
    assert (p.train.steps, p.train.batch_size, p.train.lr, p.train.betas) == (300000, 1024, 3e-4, [0.99, 0.99])
    assert (p.train.weight_decay, p.train.warmup_steps, p.train.ema_decay) == (0.03, 5000, 0.9999)
    assert p.eval.samples == 50000 and p.eval.feature_extractor == "inception-v3-compat"
    assert [r.paper for r in paper if r.seed == 0] == [
        {"table": "table2_ablation_imagenet64", "row": 4}, {"table": "table2_ablation_imagenet64", "row": 3},
        None, None, None]


def test_dry_run_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    for executor in ("local", "slurm"):
        code, out, err = cli(["run", NORM_ABLATION, "--dry-run", "--results", results, "--executor", executor],
                             capsys)
        assert code == 0, err
        assert "tdln-s0-" in out and "dry run: nothing written" in out
        if executor == "slurm":
            assert "#SBATCH --array=0-14%2" in out and "submitit.core._submit" in out
    code, out, err = cli(["run", NORM_ABLATION, "--dry-run", "--json", "--results", results, "--profile",
                          "paper"], capsys)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 15 and rows[0]["spec"]["train"]["steps"] == 300000
    assert rows[0]["status"] == "todo" and rows[0]["run_dir"].startswith(str(results))
    assert list(tmp_path.iterdir()) == []


BASE = """
[ablation]
name = "x"
seeds = [0]
[base]
"model.preset" = "dimr_tiny_3r"
[[variant]]
name = "v"
"""

# (file text, extra CLI args, a fragment the message must hold)
MALFORMED = [
    ("[ablation\nname=", [], "not valid TOML"),
    (BASE + "[varaint]\n", [], "did you mean 'variant'"),
    (BASE.replace('[ablation]\nname = "x"\n', "[ablation]\n"), [], "ablation.name"),
    ('[base]\n[[variant]]\nname = "v"\n', [], "missing the [ablation] table"),
    (BASE.replace('name = "x"', 'name = "../evil"'), [], "ablation name '../evil' is not allowed"),
    (BASE.replace('name = "v"', 'name = "../../escape"'), [], "variant name '../../escape' is not allowed"),
    (BASE.replace('name = "v"', 'name = "a/b"'), [], "variant name 'a/b' is not allowed"),
    (BASE.replace('name = "v"', 'name = "/tmp/abs"'), [], "is not allowed"),
    (BASE.replace('name = "v"', 'name = "ok\\n"'), [], "is not allowed"),  # $ matched before a last newline
    (BASE.replace('name = "x"', 'name = "x\\n"'), [], "is not allowed"),
    (BASE.replace('name = "v"', 'name = ""'), [], "must not be empty"),
    (BASE.replace('name = "v"', "name = 3"), [], "expected a string"),
    (BASE + '[[variant]]\nname = "v"\n', [], "duplicate variant name 'v'"),
    (BASE + '[[variant]]\nname = "V"\n', [], "duplicate variant name 'V'"),
    (BASE.replace("seeds = [0]", 'seeds = ["0"]'), [], "ablation.seeds[0]: expected an integer"),
    (BASE.replace("seeds = [0]", "seeds = []"), [], "ablation.seeds: expected a non-empty list"),
    (BASE.replace("seeds = [0]", "seeds = [-1]"), [], "ablation.seeds[0]: seeds are integers in 0..4294967295"),
    (BASE.replace("seeds = [0]", "seeds = [4294967296]"), [], "seeds are integers in 0..4294967295"),
    (BASE + '"train.lr" = nan\n', [], "train.lr: must be a finite number"),
    (BASE + '"train.ema_decay" = nan\n', [], "train.ema_decay: must be a finite number"),
    (BASE + '"sample.guidance_scale" = inf\n', [], "sample.guidance_scale: must be a finite number"),
    (BASE + '"diffusion.label_drop" = nan\n', [], "diffusion.label_drop: must be a finite number"),
    (BASE + '"train.batch_size" = 5000\n', [], "larger than the dataset"),
    (BASE + '"data.num_classes" = 9\n', [], "data.num_classes"),
    (BASE + '"diffusion.loss_weights" = [1.0]\n', [], "diffusion.loss_weights: has 1 entries"),
    (BASE + '"model.in_channels" = 4\n', [], "model.in_channels"),
    (BASE + '"eval.metrics" = ["fdi"]\n', [], "unknown metric 'fdi'"),
    (BASE + '"eval.feature_extractor" = "inception-v3-compat"\n', [], "eval.inception_weights"),
    (BASE + '"eval.feature_extractor" = "inception-v3-compat"\n"eval.inception_weights" = "/nope.pth"\n', [],
     "eval.inception_weights: '/nope.pth' not found"),
    (BASE.replace('[[variant]]', '[ablation.paper]\ntable = "tabel2"\n[[variant]]').replace(
        'seeds = [0]\n', 'seeds = [0]\n'), [], "unknown paper table 'tabel2'"),
    (BASE + 'paper = { table = "imagenet256", model = "DiMR-XXL" }\n', [], "no model 'DiMR-XXL'"),
    (BASE.replace("seeds = [0]", "seeds = [1.5]"), [], "expected an integer"),
    (BASE.replace("seeds = [0]", "seeds = [1, 1]"), [], "duplicate seeds"),
    (BASE + '"model.norm" = "tdlnn"\n', [], "unknown norm 'tdlnn'"),
    (BASE + '"model.preset" = "dimr_huge"\n', [], "unknown model preset"),
    (BASE + '"train.stepz" = 3\n', [], "did you mean 'steps'"),
    (BASE + '"train.steps" = "many"\n', [], "train.steps: expected an integer"),
    (BASE + '"train.seed" = 3\n', [], "train.seed is set from [ablation].seeds"),
    (BASE + 'factors = "x"\n', [], "factors: expected a table"),
    (BASE.replace('"model.preset" = "dimr_tiny_3r"', 'spec = "nope.toml"'), [], "no such file"),
    (BASE.replace('"model.preset" = "dimr_tiny_3r"', 'spec = "bad.toml"'), [], "not valid TOML"),
    # a path with a NUL is no path at all (no ValueError traceback); one with a newline is still one line
    (BASE.replace('"model.preset" = "dimr_tiny_3r"', 'spec = "a\\u0000b.toml"'), [], "a\\x00b.toml': not a usable path"),
    (BASE.replace('"model.preset" = "dimr_tiny_3r"', 'spec = "a\\nb.toml"'), [], "a\\nb.toml: no such file"),
    (BASE + '[profile.paper]\ninclude = "r\\u0000.toml"\n', [], "profile.paper.include"),
    (BASE + '[slurm]\npartion = "gpu"\n', [], "did you mean 'partition'"),
    (BASE + '[slurm]\ntime_min = "1h"\n', [], "slurm.time_min: expected an integer"),
    (BASE + '[slurm]\nsetup = "module load x"\n', [], "slurm.setup"),
    (BASE + '[grid]\n"train.lr" = 0.1\n', [], "expected a non-empty list"),
    (BASE + '[grid]\n"train.lr" = []\n', [], "expected a non-empty list"),
    (BASE + '[grid]\n"model.norm" = ["tdln", "nonorm"]\n', [], "unknown norm 'nonorm'"),
    (BASE.replace("seeds = [0]", 'seeds = [0]\npaper = { table = "t", rows = { w = 2 } }'), [],
     "no variant named 'w'"),
    (BASE.replace("seeds = [0]", 'seeds = [0]\nbaseline = "zz"'), [], "ablation.baseline"),
    (BASE.split("[[variant]]")[0], [], "no [[variant]] tables"),
    ("variant = 3\n" + BASE.split("[[variant]]")[0], [], "expected [[variant]] tables"),
    (BASE + '[profile.paper]\n"train.steps" = -1\n', [], "profile.paper: train.steps: must be >= 0"),
    (BASE + '[profile.paper]\n"slurm.nodes" = 0\n', [], "nodes: must be >= 1"),
    (BASE, ["--profile", "papr"], "unknown profile 'papr'"),
    # a file without profiles was said to define 'tiny'
    (BASE, ["--profile", "paper"], "this file defines no profile: add [profile.paper], or run the default 'tiny'"),
    (BASE + '[profile.small]\n"train.steps" = 3\n', ["--profile", "smal"],
     "unknown profile 'smal'; this file defines: small (did you mean 'small'?)"),
    (BASE, ["--set", "train.nosuch=1"], "--set: train.nosuch"),
    (BASE, ["--set", "train.steps"], "expected key=value"),
    (BASE, ["--set", "train.seed=4"], "train.seed is set per run"),
    (BASE, ["--set", "slurm.nodes=zero"], "slurm.nodes: expected an integer"),
    (BASE, ["--set", "ablation.seeds=[-2]"], "ablation.seeds"),
    (BASE, ["--set", "train.lr=nan"], "--set: train.lr: must be a finite number"),
    (BASE, ["--seeds", "0,x"], "--seeds"),
    (BASE, ["--only", "w"], "no variant named 'w'"),
    (BASE, ["--executor", "kubernetes"], "--executor 'kubernetes'"),
    (BASE, ["--executor", "slrum"], "did you mean 'slurm'"),
    (BASE, ["--jobs", "-1"], "--jobs -1"),
    (BASE, ["--jobs", "many"], "--jobs"),
]


@pytest.mark.parametrize("text,args,fragment", MALFORMED, ids=[f"case{i}" for i in range(len(MALFORMED))])
def test_malformed_input_exit_2(tmp_path, capsys, monkeypatch, text, args, fragment):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "bad.toml").write_text("[model\n")
    path = write(work, text)
    results = tmp_path / "results"
    code, out, err = cli(["run", path, "--results", results, *args], capsys)
    assert code == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 or "Usage" in err, err            # click's usage errors print a usage line too
    assert "Traceback" not in err + out
    assert fragment in err, err
    if "Usage" not in err:
        assert "abl.toml" in err or args, err                    # file errors name the file
    assert not results.exists()
    assert sorted(p.name for p in work.iterdir()) == ["abl.toml", "bad.toml"]


def test_missing_file_and_directory_and_bad_results(tmp_path, capsys):
    code, out, err = cli(["run", tmp_path / "nope.toml"], capsys)
    assert code == 2 and "no such file" in err and "Traceback" not in err
    code, out, err = cli(["run", tmp_path], capsys)
    assert code == 2 and "is a directory" in err
    (tmp_path / "results").write_text("not a folder")
    good = write(tmp_path, BASE)
    code, out, err = cli(["run", good, "--results", tmp_path / "results"], capsys)
    assert code == 2 and "is not a folder" in err
    code, out, err = cli(["status", tmp_path / "absent"], capsys)
    assert code == 2 and "no such folder" in err
    code, out, err = cli(["cancel", tmp_path / "absent"], capsys)
    assert code == 2 and "no such folder" in err
    for command in ("status", "cancel"):  # a file is no folder of runs (status listed none and exited 0)
        code, out, err = cli([command, tmp_path / "results"], capsys)
        assert code == 2 and "a file, not a folder" in err and len(err.strip().splitlines()) == 1, err


def test_errors_name_file_and_key(tmp_path):
    with pytest.raises(SpecError) as e:
        load_ablation(write(tmp_path, BASE + '"model.norm" = "tdlnn"\n'))
    assert e.value.file == str(tmp_path / "abl.toml")
    assert "variant 'v'" in str(e.value) and "model.norm" in str(e.value)


def test_variant_profile_overrides_and_variant_paper_rows(tmp_path):
    """[variant.profile.P] applies after the variant under profile P only; a variant's own paper row wins."""
    f = tmp_path / "a.toml"
    f.write_text('''
[ablation]
name = "sizes"
seeds = [0]
paper = { table = "table2_ablation_imagenet64", rows = { small = 5 } }
[base]
spec = "default"
[[variant]]
name = "small"
"model.preset" = "dimr_tiny_3r"
[[variant]]
name = "big"
paper = { table = "imagenet256", model = "DiMR-XL/2R", epochs = 800 }
"model.preset" = "dimr_xl_2r"
"data.name" = "latents"
"eval.feature_extractor" = "inception-v3-compat"
"eval.metrics" = ["fid", "isc"]
[variant.profile.tiny]
"model.preset" = "dimr_tiny_2r"
"data.name" = "shapes"
"eval.feature_extractor" = "classifier"
[profile.tiny]
"train.steps" = 5
[profile.paper]
"train.steps" = 1000
''')
    abl = load_ablation(f)
    tiny = {r.variant: r for r in expand(abl, "tiny", results=tmp_path / "r")}
    paper = {r.variant: r for r in expand(abl, "paper", results=tmp_path / "r")}
    assert tiny["big"].spec.model.name == "DiMR-tiny/2R" and tiny["big"].spec.data.name == "shapes"
    assert paper["big"].spec.model.name == "DiMR-XL/2R" and paper["big"].spec.data.name == "latents"
    assert paper["big"].paper == {"table": "imagenet256", "model": "DiMR-XL/2R", "epochs": 800}
    assert tiny["small"].paper == {"table": "table2_ablation_imagenet64", "row": 5}

    text = f.read_text()
    f.write_text(text.replace("epochs = 800 }", "epochs = 800, epochs_at = { 500000 = 400 } }"))
    assert load_ablation(f).variants[1].paper["epochs_at"] == {"500000": 400}
    for bad, match in (("{ 500000 = 600 }", "epochs_at.500000.*no model 'DiMR-XL/2R' with 600 epochs"),
                       ('{ x = 400 }', "epochs_at.x.*not a training step"),
                       ('{ 5 = "400" }', "epochs_at.5.*expected an integer")):
        f.write_text(text.replace("epochs = 800 }", f"epochs = 800, epochs_at = {bad} }}"))
        with pytest.raises(SpecError, match=match):
            load_ablation(f)
    f.write_text(text.replace("[variant.profile.tiny]", "[variant.profile.tiyn]"))
    with pytest.raises(SpecError, match="no \\[profile.tiyn\\].*did you mean 'tiny'"):
        load_ablation(f)


def test_profiles_include_recipes_extend_each_other_and_have_their_own_seeds(tmp_path):
    (tmp_path / "recipes").mkdir()
    write(tmp_path / "recipes", '[train]\nlr = 5e-4\nwarmup_steps = 7\n[slurm]\ngpus_per_node = 2\n', "r.toml")
    text = GOOD.replace('[grid]\n"train.lr" = [1e-3, 3e-4]\n', "").replace('[profile.paper]', '''[profile.small]
extends = "tiny"
include = "recipes/r.toml"
seeds = [4, 5, 6]
"train.warmup_steps" = 9

[profile.paper]''').replace('"model.norm" = "tdln"\n', '"model.norm" = "tdln"\n[variant.profile.tiny]\n"train.lr" = 1e-3\n', 1)
    abl = load_ablation(write(tmp_path, text))
    small = expand(abl, "small", results=tmp_path / "r")
    assert {r.seed for r in small} == {4, 5, 6} and {r.seed for r in expand(abl, "tiny", results=tmp_path)} == {0, 1}
    assert len(small) == 2 * 3
    by = {r.variant: r.spec for r in small}
    # tiny's batch size, the recipe's lr, the profile's own warm-up; b's tiny-profile lr (a variant
    # override of the extended profile) beats the recipe
    assert by["a"].train.batch_size == 8 and by["a"].train.lr == 5e-4 and by["a"].train.warmup_steps == 9
    assert by["b"].train.lr == 1e-3
    assert slurm_settings(abl, "small").gpus_per_node == 2
    bad = text.replace('extends = "tiny"', 'extends = "tinny"')
    with pytest.raises(SpecError, match="did you mean 'tiny'"):
        load_ablation(write(tmp_path, bad))
    cyc = text.replace('[profile.tiny]', '[profile.tiny]\nextends = "small"')
    with pytest.raises(SpecError, match="cycle"):
        load_ablation(write(tmp_path, cyc))
    with pytest.raises(SpecError, match="include"):
        load_ablation(write(tmp_path, text.replace("recipes/r.toml", "recipes/none.toml")))


def test_a_spec_loaded_again_works_out_no_type_hints_and_its_input_is_left_as_it_was(monkeypatch):
    # `table`, `status` and `run --dry-run` load a spec per run of a results tree: typing.get_type_hints, which
    # compiles every annotation of a section on each call, was most of their time
    import copy
    import typing

    data = to_dict(load_run_spec(None))
    load_run_spec(data)
    calls = []
    real = typing.get_type_hints
    monkeypatch.setattr(typing, "get_type_hints", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    before = copy.deepcopy(data)
    spec = load_run_spec(data)
    assert calls == []
    assert data == before and to_dict(spec) == before  # read, not written into (it is no longer copied first)
    data["train"]["betas"].append(0.5)
    data["eval"]["metrics"].clear()
    data["model"]["branches"][0]["width"] = 8
    assert to_dict(spec) == before  # and the spec keeps nothing of it
    again = copy.deepcopy(before)
    assert load_run_spec(again, [("train.lr", 0.5)]).train.lr == 0.5 and again == before  # overrides: copied first


def test_each_further_seed_of_a_variant_loads_its_spec_once_and_resolves_as_the_layer_walk_does(monkeypatch):
    # a paper-scale plan is variants x seeds: the layers above the seed are checked one by one for a variant's
    # first seed only; every spec is the one the walk through the layers makes, and an error still names its layer
    from dimr_lab.spec import run_spec
    from dimr_lab.spec.ablation import resolve, variant_layers

    abl = load_ablation(Path(__file__).resolve().parents[1] / "ablations" / "branches.toml")
    calls = []
    real = run_spec.load_run_spec
    monkeypatch.setattr(run_spec, "load_run_spec", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts = {}
    for n in (2, 5):
        calls.clear()
        runs = expand(abl, "small", seeds=list(range(n)))
        counts[n] = len(calls)
    assert counts[5] - counts[2] == 3 * len(abl.variants)  # one load per further seed
    for r in runs:
        layers = variant_layers(abl, next(v for v in abl.variants if v.name == r.variant), "small", r.grid)
        walked = resolve(abl, layers + [("--set", []), ("seed", [("train.seed", r.seed)])])
        assert to_dict(walked) == to_dict(r.spec) and walked.identity_hash() == r.identity
    with pytest.raises(SpecError) as err:
        resolve(abl, [("profile.small", abl.profile_items("small")), ("variant 'one'", [("train.steps", -1)]),
                      ("seed", [("train.seed", 1)])], prefix_resolved=True)
    assert "variant 'one'" in str(err.value) and "train.steps" in str(err.value)
