"""Every ablations/*.toml: its tiny profile trains at micro size, its paper profile is the published recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from dimr_lab.runner.plan import expand
from dimr_lab.spec.ablation import load_ablation

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "ablations").glob("*.toml"))

# ../shared/DIMR.md: the released recipe (ImageNet 256/512 latents) and U-ViT-M's (ImageNet 64, Table 2)
COMMON = {"train.batch_size": 1024, "train.betas": [0.99, 0.99], "train.weight_decay": 0.03,
          "train.warmup_steps": 5000, "train.ema_decay": 0.9999, "train.no_decay": "td_only",
          "diffusion.schedule": "scaled_linear", "diffusion.num_steps": 1000, "diffusion.label_drop": 0.1,
          "eval.samples": 50000, "eval.feature_extractor": "inception-v3-compat"}
LATENT = {"train.steps": 1_000_000, "train.lr": 2e-4, "train.grad_clip": 0.0, "train.precision": "fp16",
          "data.name": "latents", "sample.sampler": "dpm_solver++_fast", "sample.order": 3, "sample.steps": 250,
          "sample.t_end": 1e-3, "sample.guidance_scale": 0.4, "sample.guidance_form": "uvit",
          "diffusion.multiscale_loss": True}
PIXEL64 = {"train.steps": 300_000, "train.lr": 3e-4, "data.name": "folder", "data.image_size": 64,
           "sample.sampler": "dpm_solver++", "sample.steps": 50, "sample.guidance_scale": 0.0}


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
        for key, want in recipe.items():
            got = _get(spec, key)
            assert got == pytest.approx(want), f"{path.name} {run.variant}: {key} = {got!r}, recipe {want!r}"
        if spec.data.name == "latents":
            assert spec.data.vae and spec.eval.reference_stats, "latent runs decode with a VAE, FID vs ADM stats"
        assert spec.model.image_size == spec.data.image_size


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
        assert run.paper and run.paper["model"] == run.spec.model.name


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_tiny_profile_trains_every_variant_at_micro_size(path, tmp_path):
    """Each variant of the tiny profile, cut to two steps: the networks build, train, sample and checkpoint."""
    from dimr_lab.train.trainer import train_run

    micro = [("train.steps", 2), ("train.checkpoint_every", 1), ("data.train_size", 64), ("eval.enabled", False),
             ("sample.grid_size", 2), ("sample.steps", 2), ("train.batch_size", 4)]
    runs = expand(load_ablation(path), "tiny", micro, results=tmp_path, seeds=[0])
    assert {r.variant for r in runs} == {v.name for v in load_ablation(path).variants}
    for run in runs:
        metrics = train_run(run.spec, run.run_dir, progress=False)
        assert metrics["steps"] == 2 and (run.run_dir / "checkpoints" / "last.pt").is_file()
        assert list(run.run_dir.glob("evals/step-00000002-*/samples.png"))
