"""Every ablations/*.toml: its tiny profile trains at micro size, its paper profile is the published recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dimr_lab.diffusion.training import loss_weights
from dimr_lab.runner.plan import expand
from dimr_lab.spec.ablation import load_ablation

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "ablations").glob("*.toml"))

# ../shared/DIMR.md and the released configs. ImageNet 256/512 latents: the released DiMR recipe
# (configs/DiMR-*_imagenet256.py, train.py, eval.py). ImageNet 64 pixels: U-ViT's released recipe, which
# the paper's ImageNet-64 rows follow (configs/imagenet64_uvit_mid.py, train.py with sde.VPSDE, eval.py
# with DPM-Solver-fast), and DiMR's pixel wrapper for the time input.
COMMON = {"train.batch_size": 1024, "train.betas": [0.99, 0.99], "train.weight_decay": 0.03,
          "train.warmup_steps": 5000, "train.ema_decay": 0.9999, "train.no_decay": "td_only",
          "train.lr_schedule": "constant", "train.grad_clip": 0.0, "train.precision": "fp16",
          "train.ema_warmup": False, "eval.samples": 50000, "eval.feature_extractor": "inception-v3-compat"}
LATENT = {"train.steps": 1_000_000, "train.lr": 2e-4, "data.name": "latents", "diffusion.schedule": "scaled_linear",
          "diffusion.num_steps": 1000, "diffusion.time_input": "discrete", "diffusion.label_drop": 0.1,
          "sample.sampler": "dpm_solver++_fast", "sample.order": 3, "sample.steps": 250, "sample.t_end": 1e-3,
          "sample.guidance_scale": 0.4, "sample.guidance_form": "uvit", "diffusion.multiscale_loss": True,
          "eval.labels": "balanced",
          # eval.py: DPM_Solver.sample's defaults (skip_type='time_uniform'), cfg_scale_pow = -1 (no ramp)
          "sample.skip_type": "time_uniform", "sample.guidance_schedule": "constant",
          "diffusion.prediction": "eps", "data.num_classes": 1000, "model.num_classes": 1000,
          "model.in_channels": 4, "model.out_channels": 4}
PIXEL64 = {"train.steps": 300_000, "train.lr": 3e-4, "data.name": "folder", "data.image_size": 64,
           "data.num_classes": 1000, "data.flip": True, "diffusion.schedule": "vp_linear", "diffusion.beta_min": 0.1,
           "diffusion.beta_max": 20.0, "diffusion.time_input": "vp_logsnr", "diffusion.label_drop": 0.0,
           "sample.sampler": "dpm_solver_fast", "sample.steps": 50, "sample.order": 3, "sample.t_end": 1e-4,
           "sample.guidance_scale": 0.0, "eval.labels": "frequency",
           "eval.reference_stats": "data/VIRTUAL_imagenet64_labeled.npz", "diffusion.prediction": "eps",
           "model.num_classes": 1000, "model.in_channels": 3, "model.out_channels": 3, "data.vae": ""}
# ADM's reference batches (guided-diffusion evaluations), by latent size: 32 -> ImageNet 256, 64 -> 512
LATENT_REFERENCE = {32: "data/VIRTUAL_imagenet256_labeled.npz", 64: "data/VIRTUAL_imagenet512.npz"}
IMAGENET_TRAIN = 1_281_167  # images; epochs = steps * batch / IMAGENET_TRAIN
# runs whose number of steps is what their file varies: multi_branch_compute trains its single-branch network
# the multi-branch network's steps times their GMACs ratio (test_multi_branch_compute_matches_training_compute)
COMPUTE_MATCHED = {("multi_branch_compute", "adaln_zero")}
# recipe keys a file's variant departs from because they are what the file varies (its own test holds the rest)
VARIED = {("multiscale_loss_2r", "single_scale"): {"diffusion.multiscale_loss"}}


def _get(spec, dotted):
    section, key = dotted.split(".")
    return getattr(getattr(spec, section), key)


def test_every_ablation_file_is_covered():
    assert {f.stem for f in FILES} >= {"tdln_vs_adaln", "table2_components", "branches", "patch_size",
                                       "branch_blocks", "main_results"}


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_paper_profile_is_the_published_recipe(path, tmp_path):
    runs = expand(load_ablation(path), "paper", results=tmp_path)
    assert runs and {r.seed for r in runs} == set(load_ablation(path).seeds)
    for run in runs:
        spec = run.spec
        recipe = {**COMMON, **(LATENT if spec.data.name == "latents" else PIXEL64)}
        if (path.stem, run.variant) in COMPUTE_MATCHED:
            del recipe["train.steps"]
        for key in VARIED.get((path.stem, run.variant), ()):
            del recipe[key]
        for key, want in recipe.items():
            got = _get(spec, key)
            assert got == pytest.approx(want), f"{path.name} {run.variant}: {key} = {got!r}, recipe {want!r}"
        if spec.data.name == "latents":
            assert spec.data.vae, "latent runs decode with a VAE"
            assert spec.eval.reference_stats == LATENT_REFERENCE[spec.data.image_size], run.variant
        assert spec.model.image_size == spec.data.image_size
        if spec.diffusion.multiscale_loss and len(spec.model.branches) == 2:
            # the released 2R configs: loss_coeffs = [1/4, 1]
            assert loss_weights(spec.diffusion, 2) == pytest.approx([0.25, 1.0])


def test_main_results_evaluate_the_papers_epochs(tmp_path):
    """Each main result is evaluated at the epochs of its published rows (800, and 400 where the paper has a
    400-epoch row) on ImageNet's 1,281,167 training images at batch 1024."""
    import csv

    tables = {t: list(csv.DictReader(open(ROOT / "dimr_lab" / "paper" / f"{t}.csv"))) for t in ("imagenet256", "imagenet512")}
    for run in expand(load_ablation(ROOT / "ablations" / "main_results.toml"), "paper", results=tmp_path, seeds=[0]):
        spec, paper = run.spec, run.paper
        if spec.data.name != "latents":
            continue
        published = {int(r["epochs"]) for r in tables[paper["table"]] if r["model"] == paper["model"] and r["epochs"]}
        epochs = lambda step: step * spec.train.batch_size / IMAGENET_TRAIN
        evaluated = {round(epochs(step) / 100) * 100: step for step in spec.eval_steps()}
        assert published <= set(evaluated), (run.variant, published, evaluated)
        for e in published:
            assert epochs(evaluated[e]) == pytest.approx(e, rel=0.01), (run.variant, e)
        assert paper["epochs"] == max(published)
        assert {int(k): v for k, v in paper.get("epochs_at", {}).items()} == \
            {s: e for e, s in evaluated.items() if e in published and s != spec.train.steps}


# the variant of each file that is the full DiMR-M/3R
DIMR_M_3R = {("table2_components", "dimr"), ("branches", "three"), ("patch_size", "multires"),
             ("branch_blocks", "convnext"), ("main_results", "dimr_m_3r")}


def test_one_imagenet64_recipe_across_files(tmp_path):
    """Every ImageNet-64 paper run, in every file, trains and samples with the same recipe; DiMR-M/3R is one
    network wherever it appears with all its components."""
    from dimr_lab.spec.schema import to_dict

    recipes, m3r = {}, set()
    for path in FILES:
        for run in expand(load_ablation(path), "paper", results=tmp_path, seeds=[0]):
            spec = run.spec
            if spec.data.name != "folder":
                continue
            data = to_dict(spec)
            recipe = {k: data[k] for k in ("diffusion", "sample", "eval")}
            recipe["diffusion"] = {k: v for k, v in recipe["diffusion"].items() if k not in ("multiscale_loss",)}
            # how the initial weights are drawn is what ablations/init_draws.toml varies, not the recipe
            recipe["train"] = {k: v for k, v in data["train"].items() if k not in ("seed", "init_draws")}
            if (path.stem, run.variant) in COMPUTE_MATCHED:  # its steps are checked by its own test
                recipe["train"]["steps"] = PIXEL64["train.steps"]
            # where along the way a run is also evaluated is not the recipe (tdln_vs_adaln_long's curves)
            recipe["eval"] = {k: v for k, v in recipe["eval"].items() if k != "steps"}
            recipe["data"] = data["data"]
            recipes[json.dumps(recipe, sort_keys=True)] = f"{path.stem}/{run.variant}"
            if (path.stem, run.variant) in DIMR_M_3R:
                m3r.add(json.dumps(to_dict(spec.model), sort_keys=True))
    assert len(recipes) == 1, f"several ImageNet-64 recipes: {sorted(recipes.values())}"
    assert len(m3r) == 1, "DiMR-M/3R differs between files"


def test_table2_rows_follow_the_published_components(tmp_path):
    """Each Table 2 variant has exactly the components its published row lists."""
    import csv

    rows = {r["row"]: r for r in csv.DictReader(open(ROOT / "dimr_lab" / "paper" / "table2_ablation_imagenet64.csv"))}
    abl = load_ablation(ROOT / "ablations" / "table2_components.toml")
    for run in expand(abl, "paper", results=tmp_path, seeds=[0]):
        m, row = run.spec.model, rows[str(run.paper["row"])]
        has = {"adaln_zero": m.norm == "adaln_zero", "tdln": m.norm in ("tdln", "tdrmsnorm"),
               "multi_branch": len(m.branches) > 1, "glu": m.mlp == "glu",
               "multi_scale_loss": run.spec.diffusion.multiscale_loss}
        assert has == {k: row[k] == "1" for k in has}, (run.variant, has)


def test_main_results_presets_have_the_papers_sizes(tmp_path):
    from dimr_lab.nn.describe import count
    from dimr_lab.spec.presets import PAPER_SIZES

    runs = expand(load_ablation(ROOT / "ablations" / "main_results.toml"), "paper", results=tmp_path, seeds=[0])
    by_name = {"DiMR-XL/2R": "dimr_xl_2r", "DiMR-G/2R": "dimr_g_2r", "DiMR-XL/3R": "dimr_xl_3r",
               "DiMR-M/3R": "dimr_m_3r", "DiMR-L/3R": "dimr_l_3r"}
    assert sorted(r.spec.model.name for r in runs) == sorted(by_name)
    for run in runs:
        params, gmacs, tol = PAPER_SIZES[by_name[run.spec.model.name]]
        info = count(run.spec.model)
        assert info["params"] == pytest.approx(params, rel=tol)
        if gmacs is not None:  # the paper's GFLOPs (multiply-accumulates, ../shared/DIMR.md)
            assert info["gmacs"] == pytest.approx(gmacs, rel=tol), run.spec.model.name
        assert run.paper and run.paper["model"] == run.spec.model.name


CPU_PROFILES = [(f, p) for f in FILES for p in ("tiny", "small", "gpu") if p in load_ablation(f).profile_names()]


@pytest.mark.parametrize("path,profile", CPU_PROFILES, ids=[f"{f.stem}-{p}" for f, p in CPU_PROFILES])
def test_cpu_and_gpu_profiles_train_every_variant_at_micro_size(path, profile, tmp_path):
    """Each variant of the tiny, small and gpu profiles, cut to two steps on the CPU: the networks build,
    train, sample and checkpoint."""
    from dimr_lab.train.trainer import train_run

    micro = [("train.steps", 2), ("train.checkpoint_every", 1), ("data.train_size", 64), ("eval.enabled", False),
             ("eval.steps", []), ("sample.grid_size", 2), ("sample.steps", 2), ("train.batch_size", 4),
             ("train.precision", "fp32"), ("train.compile", False)]  # compiled blocks: tests/test_models.py
    runs = expand(load_ablation(path), profile, micro, results=tmp_path, seeds=[0])
    assert {r.variant for r in runs} == {v.name for v in load_ablation(path).variants}
    for run in runs:
        metrics = train_run(run.spec, run.run_dir, progress=False)
        assert metrics["steps"] == 2 and (run.run_dir / "checkpoints" / "last.pt").is_file()
        assert list(run.run_dir.glob("evals/step-00000002-*/samples.png"))


def test_small_profile_is_the_small_protocol(tmp_path):
    """What RESULTS.md's small runs promise: unguided, EMA warm-up, >= 1024 samples, three or more evaluation
    points, six or more seeds, the released pixel-space diffusion."""
    for path in ("table2_components", "tdln_vs_adaln", "branches", "patch_size", "branch_blocks",
                 "multiscale_loss_2r", "tdln_single_branch", "tdln_single_branch_matched",
                 "tdln_single_branch_long", "tdln_single_branch_longer"):
        abl = load_ablation(ROOT / "ablations" / f"{path}.toml")
        runs = expand(abl, "small", results=tmp_path)
        assert len({r.seed for r in runs}) >= 6
        for r in runs:
            s = r.spec
            assert s.sample.guidance_scale == 0.0 and s.diffusion.label_drop == 0.0 and s.train.ema_warmup
            assert s.eval.samples >= 1024 and len(s.eval_steps()) >= 3
            assert (s.diffusion.schedule, s.diffusion.time_input, s.sample.sampler) == \
                ("vp_linear", "vp_logsnr", "dpm_solver_fast")


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_no_shipped_profile_samples_mostly_initial_weights(path, tmp_path):
    """main_results' tiny profile evaluated at step 300 with EMA 0.995 and no EMA warm-up: its samples came
    from weights still 22% random. Every shipped profile now passes RunSpec.notes."""
    abl = load_ablation(path)
    for profile in abl.profile_names():
        for run in expand(abl, profile, results=tmp_path, seeds=[0]):
            assert run.spec.notes() == [], (profile, run.variant, run.spec.notes())


def test_a_short_run_with_a_slow_ema_gets_a_note(tmp_path, capsys):
    """A researcher's own tiny profile (200 steps, the default run's EMA 0.995) is said before it trains, on
    stderr, once for the variants it concerns; the plan on stdout stays JSON."""
    from conftest import cli
    from dimr_lab.spec.run_spec import load_run_spec

    short = load_run_spec(None, [("train.steps", 200)])
    (note,) = short.notes()
    assert "at step 200" in note and "37% of the random initial weights" in note and "train.ema_warmup" in note
    assert load_run_spec(None, [("train.steps", 200), ("train.ema_warmup", True)]).notes() == []
    assert load_run_spec(None, [("train.steps", 200), ("sample.use_ema", False)]).notes() == []
    assert load_run_spec(None, [("train.steps", 500)]).notes() == []  # 8%: the shipped tiny profiles
    (frozen,) = load_run_spec(None, [("train.ema_decay", 1.0)]).notes()  # an EMA that never moves
    assert frozen.startswith("train.ema_decay = 1.0 never moves: at step 1800") and "100%" in frozen
    assert load_run_spec(None, [("train.steps", 200), ("train.ema_decay", 0.0)]).notes() == []
    early = load_run_spec(None, [("train.steps", 1800), ("eval.steps", [100])]).notes()
    assert len(early) == 1 and "at step 100" in early[0]
    path = tmp_path / "mine.toml"
    path.write_text('[ablation]\nname = "mine"\nseeds = [0, 1]\n[base]\nspec = "default"\n'
                    '[[variant]]\nname = "glu"\n[[variant]]\nname = "mlp"\n"model.mlp" = "mlp"\n'
                    '[[variant]]\nname = "warm"\n"train.ema_warmup" = true\n'
                    '[profile.tiny]\n"train.steps" = 200\n')
    code, out, err = cli(["run", path, "--results", tmp_path / "r", "--dry-run", "--json"], capsys)
    assert code == 0, err
    assert [json.loads(line)["variant"] for line in out.splitlines()] == ["glu"] * 2 + ["mlp"] * 2 + ["warm"] * 2
    notes = [line for line in err.splitlines() if line.startswith("note")]
    assert len(notes) == 1 and notes[0].startswith("note (glu, mlp): train.ema_decay = 0.995")


def test_the_readme_ablation_example_runs_as_written(tmp_path):
    """README's own-ablation example is a file `dimr-lab run` takes: its variants, grid and profile expand."""
    import re

    readme = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "[ablation]" in b]
    path = tmp_path / "mine.toml"
    path.write_text(block)
    abl = load_ablation(path)
    runs = expand(abl, "tiny", results=tmp_path)
    assert len(runs) == 2 * 2 * len(abl.seeds) and abl.baseline == "glu"
    mlp = [r for r in runs if r.variant == "mlp"]
    assert {r.spec.model.mlp for r in mlp} == {"mlp"} and {r.spec.model.branches[0].mlp_width for r in mlp} == {288}
    assert {r.spec.model.pos_embed for r in runs} == {"learned", "sincos"}
    assert all(r.spec.train.ema_warmup and r.spec.notes() == [] for r in runs)


def _beside_tdln_vs_adaln(name: str, tmp_path) -> "list[tuple[str, object, object, set[str]]]":
    """ablations/<name>.toml's runs beside tdln_vs_adaln's TD-LN and adaLN-Zero runs (see _beside)."""
    return _beside(name, "tdln_vs_adaln", ("tdln", "adaln_zero"), tmp_path)


def _beside(name: str, other: str, variants: tuple[str, ...], tmp_path) -> "list[tuple[str, object, object, set[str]]]":
    """ablations/<name>.toml's runs beside <other>.toml's runs of `variants` of the same profile, variant and
    seed (the two files have the same profiles, and name holds exactly those variants): (profile, its run,
    the other file's run, the run-spec keys whose values differ)."""
    ours_file, theirs_file = (load_ablation(ROOT / "ablations" / f"{n}.toml") for n in (name, other))
    assert ours_file.profile_names() == theirs_file.profile_names()
    pairs = []
    for profile in ours_file.profile_names():
        ours = {(r.variant, r.seed): r for r in expand(ours_file, profile, results=tmp_path / "a")}
        theirs = {(r.variant, r.seed): r for r in expand(theirs_file, profile, results=tmp_path / "b")
                  if r.variant in variants}
        assert ours.keys() == theirs.keys() and {v for v, _ in ours} == set(variants), profile
        for key, run in ours.items():
            assert run.paper == theirs[key].paper
            pairs.append((profile, run, theirs[key], _differ(run.spec, theirs[key].spec)))
    return pairs


def _differ(spec_a, spec_b) -> set[str]:
    """The dotted run-spec keys (train.steps, model.norm, ...) whose values differ between two specs."""
    from dataclasses import asdict

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(asdict(spec_a)), flat(asdict(spec_b))
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


def test_init_draws_is_tdln_vs_adaln_but_for_how_the_weights_are_drawn(tmp_path):
    """ablations/init_draws.toml's promise: its runs are tdln_vs_adaln's TD-LN and adaLN-Zero runs, seed for
    seed and profile for profile, with train.init_draws = "by_name" the one difference (RESULTS.md compares
    the spread of their per-seed differences across the two files)."""
    for profile, ours, theirs, differ in _beside_tdln_vs_adaln("init_draws", tmp_path):
        assert differ == {"train.init_draws"}, (profile, ours.variant, ours.seed)
        assert (ours.spec.train.init_draws, theirs.spec.train.init_draws) == ("by_name", "stream")


def test_tdln_vs_adaln_long_is_tdln_vs_adaln_trained_longer(tmp_path):
    """ablations/tdln_vs_adaln_long.toml's promise: its runs are tdln_vs_adaln's TD-LN and adaLN-Zero runs,
    seed for seed and profile for profile, the same identities (what they train), with only the number of
    steps and the evaluation points changed: longer in every CPU and GPU profile, evaluating every step the
    shorter run evaluates."""
    _assert_trained_longer(_beside_tdln_vs_adaln("tdln_vs_adaln_long", tmp_path))


def test_tdln_single_branch_long_is_tdln_single_branch_trained_longer(tmp_path):
    """ablations/tdln_single_branch_long.toml's promise: its runs are tdln_single_branch's adaLN-Zero (Table 2's
    row 2) and TD-LN runs, seed for seed and profile for profile, the same identities, with only the number of
    steps and the evaluation points changed."""
    pairs = _beside("tdln_single_branch_long", "tdln_single_branch", ("adaln_zero", "tdln"), tmp_path)
    assert {profile for profile, *_ in pairs} == {"tiny", "small", "gpu", "paper"}
    _assert_trained_longer(pairs)


def test_tdln_single_branch_longer_is_tdln_single_branch_long_trained_longer(tmp_path):
    """ablations/tdln_single_branch_longer.toml's promise: tdln_single_branch_long's runs, seed for seed and
    profile for profile, the same identities (so its trained folders are continued), twice as long again."""
    pairs = _beside("tdln_single_branch_longer", "tdln_single_branch_long", ("adaln_zero", "tdln"), tmp_path)
    assert {profile for profile, *_ in pairs} == {"tiny", "small", "gpu", "paper"}
    _assert_trained_longer(pairs)


def _assert_trained_longer(pairs) -> None:
    """Each (profile, run, shorter file's run, differing keys) of _beside: the same run but for its number of
    steps and evaluation points (so the same identity and folder), twice as long in every CPU and GPU
    profile, and evaluated at every step the shorter run is."""
    for profile, ours, theirs, differ in pairs:
        assert differ <= {"train.steps", "eval.steps"}, profile
        assert ours.spec.identity() == theirs.spec.identity() and ours.run_dir.name == theirs.run_dir.name
        if profile != "paper":
            assert ours.spec.train.steps == 2 * theirs.spec.train.steps, profile
            assert set(theirs.spec.eval_steps()) < set(ours.spec.eval_steps()), profile


def _assert_matched_by_depth(ours_name: str, source_name: str, tmp_path: Path) -> None:
    """An ablation file matching TD-LN and adaLN-Zero in parameters by depth: its tdln and adaln_zero runs are
    `source_name`'s (the same specs, so the same folders and identities: their trained state is reused), and each
    matched variant is its norm's network with only the Transformer's depth changed, landing within 10% of the
    other norm's parameter count in every profile, on the side of fewer."""
    from dataclasses import asdict, replace

    from dimr_lab.spec.counts import lookup

    ours_file, source_file = (load_ablation(ROOT / "ablations" / f"{n}.toml") for n in (ours_name, source_name))
    assert ours_file.profile_names() == source_file.profile_names()
    for profile in ours_file.profile_names():
        ours = {(r.variant, r.seed): r for r in expand(ours_file, profile, results=tmp_path / "a")}
        source = {(r.variant, r.seed): r for r in expand(source_file, profile, results=tmp_path / "b")
                  if r.variant in ("tdln", "adaln_zero")}
        seeds = {s for _, s in source}
        assert {v for v, _ in ours} == {"tdln", "adaln_zero", "tdln_deep", "adaln_zero_shallow"}, profile
        assert {s for _, s in ours} == seeds and len({v for v, _ in source}) == 2, profile
        for key, run in source.items():
            assert asdict(ours[key].spec) == asdict(run.spec), (profile, key)
            assert ours[key].run_dir.name == run.run_dir.name and ours[key].paper == run.paper
        first = min(seeds)  # seeds do not change the network; counts are shipped in counts.json (test_counts)
        params = {v: lookup(ours[(v, first)].spec.model)["params"] for v, _ in ours}
        for matched, own, other in (("tdln_deep", "tdln", "adaln_zero"), ("adaln_zero_shallow", "adaln_zero", "tdln")):
            for seed in seeds:
                m, base = ours[(matched, seed)].spec, ours[(own, seed)].spec
                depth = m.model.branches[0].depth
                assert depth != base.model.branches[0].depth, (profile, matched)
                # the matched network is its norm's network but for branch 0's depth: same training, same rest
                same = replace(m, model=replace(m.model, branches=[replace(m.model.branches[0],
                                                                           depth=base.model.branches[0].depth),
                                                                   *m.model.branches[1:]]))
                assert asdict(same) == asdict(base), (profile, matched, seed)
            assert 0.9 * params[other] <= params[matched] <= params[other], (profile, matched, params)


def test_tdln_vs_adaln_matched_matches_parameters_by_depth_alone(tmp_path):
    """ablations/tdln_vs_adaln_matched.toml's promise, in the multi-branch network of tdln_vs_adaln_long."""
    _assert_matched_by_depth("tdln_vs_adaln_matched", "tdln_vs_adaln_long", tmp_path)


def test_tdln_single_branch_matched_matches_parameters_by_depth_alone(tmp_path):
    """ablations/tdln_single_branch_matched.toml's promise, in the single-branch network of tdln_single_branch
    (whose adaln_zero is Table 2's row 2)."""
    _assert_matched_by_depth("tdln_single_branch_matched", "tdln_single_branch", tmp_path)


def test_multi_branch_compute_matches_training_compute(tmp_path):
    """ablations/multi_branch_compute.toml's promise: multi_branch is tdln_vs_adaln_long's adaln_zero run (the
    same spec, so its trained folders are reused), adaln_zero is Table 2's row 2 (the same identity) trained
    longer, and in every profile the single branch trains and is evaluated at the multi-branch network's
    steps times the ratio of the two networks' forward GMACs (equal training compute at equal batch)."""
    from dataclasses import asdict

    from dimr_lab.spec.counts import lookup

    ours_file, long_file, table2_file = (load_ablation(ROOT / "ablations" / f"{n}.toml")
                                         for n in ("multi_branch_compute", "tdln_vs_adaln_long", "table2_components"))
    assert ours_file.profile_names() == long_file.profile_names() == table2_file.profile_names()
    for profile in ours_file.profile_names():
        ours = {(r.variant, r.seed): r for r in expand(ours_file, profile, results=tmp_path / "a")}
        long = {(r.variant, r.seed): r for r in expand(long_file, profile, results=tmp_path / "b")}
        table2 = {(r.variant, r.seed): r for r in expand(table2_file, profile, results=tmp_path / "c")}
        seeds = {s for _, s in long}
        assert set(ours) == {(v, s) for v in ("adaln_zero", "multi_branch") for s in seeds}, profile
        for seed in seeds:
            multi, single = ours[("multi_branch", seed)], ours[("adaln_zero", seed)]
            assert asdict(multi.spec) == asdict(long[("adaln_zero", seed)].spec), (profile, seed)
            assert multi.identity == long[("adaln_zero", seed)].identity
            row2 = table2[("adaln_zero", seed)]
            assert single.identity == row2.identity and single.paper == row2.paper, (profile, seed)
            same = asdict(single.spec)
            for section, key in (("train", "steps"), ("eval", "steps"), ("train", "checkpoint_every")):
                same[section][key] = asdict(row2.spec)[section][key]
            assert same == asdict(row2.spec), (profile, seed)
            ratio = lookup(multi.spec.model)["gmacs"] / lookup(single.spec.model)["gmacs"]
            assert ratio > 1.4, (profile, ratio)
            assert single.spec.train.steps == round(multi.spec.train.steps * ratio), profile
            assert single.spec.train.batch_size == multi.spec.train.batch_size
            matched = {round(s * ratio) for s in multi.spec.eval_steps()}
            assert matched <= set(single.spec.eval_steps()), (profile, matched, single.spec.eval_steps())
            if profile == "small":  # and the multi-branch network's own steps: the equal-step comparison
                assert {3000, 6000} <= set(single.spec.eval_steps())


def test_multiscale_loss_long_is_table2_trained_longer(tmp_path):
    """ablations/multiscale_loss_long.toml's promise: its runs are Table 2's glu and dimr runs, seed for seed and
    profile for profile, the same identities, with only the number of steps and the evaluation points
    changed: twice as long in every CPU and GPU profile, evaluating every step the shorter run evaluates."""
    pairs = _beside("multiscale_loss_long", "table2_components", ("glu", "dimr"), tmp_path)
    assert {profile for profile, *_ in pairs} == {"tiny", "small", "gpu", "paper"}
    _assert_trained_longer(pairs)


def test_multiscale_loss_2r_differs_in_the_loss_alone(tmp_path):
    """ablations/multiscale_loss_2r.toml's promise: in every profile and seed its two variants are one run
    spec but for diffusion.multiscale_loss, on DiMR's two-branch network (Transformer at half the resolution
    below a ConvNeXt branch at full resolution), with the released 2R weights [1/4, 1] against the last
    branch alone; its paper profile's multi-scale run is main_results' DiMR-XL/2R run, identity for identity."""
    abl = load_ablation(ROOT / "ablations" / "multiscale_loss_2r.toml")
    assert set(abl.profile_names()) == {"tiny", "small", "gpu", "paper"}
    for profile in abl.profile_names():
        runs = {(r.variant, r.seed): r for r in expand(abl, profile, results=tmp_path)}
        assert {v for v, _ in runs} == {"single_scale", "multiscale"}
        assert len({s for _, s in runs}) >= (6 if profile == "small" else 3), profile
        for seed in {s for _, s in runs}:
            single, multi = runs["single_scale", seed], runs["multiscale", seed]
            assert (single.spec.diffusion.multiscale_loss, multi.spec.diffusion.multiscale_loss) == (False, True)
            assert _differ(single.spec, multi.spec) == {"diffusion.multiscale_loss"}, (profile, seed)
            branches = multi.spec.model.branches
            assert [br.block for br in branches] == ["transformer", "convnext"], profile
            assert [br.patch for br in branches] == [2, 1], profile
            assert loss_weights(single.spec.diffusion, 2) == [0.0, 1.0]
            assert loss_weights(multi.spec.diffusion, 2) == pytest.approx([0.25, 1.0])
    main = {r.seed: r for r in expand(load_ablation(ROOT / "ablations" / "main_results.toml"), "paper",
                                      results=tmp_path / "m") if r.variant == "dimr_xl_2r"}
    ours = {r.seed: r for r in expand(abl, "paper", results=tmp_path / "p") if r.variant == "multiscale"}
    assert ours.keys() == main.keys()
    assert all(ours[s].identity == main[s].identity for s in ours)


def test_tdln_single_branch_changes_table2_row2_norms_alone(tmp_path):
    """ablations/tdln_single_branch.toml's promise: its adaln_zero runs are Table 2's row 2 (U-ViT + adaLN-Zero),
    seed for seed, profile for profile and identity for identity; its TD variants are those runs with the
    norms and how time enters changed and nothing else, on the same single-branch network."""
    abl = load_ablation(ROOT / "ablations" / "tdln_single_branch.toml")
    table2 = load_ablation(ROOT / "ablations" / "table2_components.toml")
    assert set(abl.profile_names()) == set(table2.profile_names())
    norms = {"adaln_zero": ("adaln", "adaln_zero", "adaln"), "tdrmsnorm": ("norm", "tdrmsnorm", "tdln"),
             "tdln": ("norm", "tdln", "tdln")}
    for profile in abl.profile_names():
        ours = {(r.variant, r.seed): r for r in expand(abl, profile, results=tmp_path / "a")}
        row2 = {r.seed: r for r in expand(table2, profile, results=tmp_path / "b") if r.variant == "adaln_zero"}
        assert {v for v, _ in ours} == set(norms) and {s for _, s in ours} == set(row2), profile
        for (variant, seed), run in ours.items():
            m = run.spec.model
            assert (m.conditioning, m.norm, m.outer_norm) == norms[variant], (profile, variant)
            assert len(m.branches) == 1, (profile, variant)
            differ = _differ(run.spec, row2[seed].spec)
            if variant == "adaln_zero":
                assert run.identity == row2[seed].identity and not differ
            else:
                assert differ == {"model.conditioning", "model.norm", "model.outer_norm"}, (profile, variant, seed)
