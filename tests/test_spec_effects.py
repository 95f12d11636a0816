"""Every spec key that decides numbers changes them: a key that is validated and recorded in a run's identity
or an evaluation's name but silently does nothing (as sample.seed once did) fails here. Keys that by design
change no number (OUTSIDE_IDENTITY, OUTSIDE_EVAL_IDENTITY, backends) are listed and checked as such."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dimr_lab.nn.network import build_model
from dimr_lab.spec.model_spec import resolve_model
from dimr_lab.spec.run_spec import OUTSIDE_EVAL_IDENTITY, OUTSIDE_IDENTITY

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_spec  # noqa: E402

# ------------------------------------------------------------------------------------------------ model

TINY = "dimr_tiny_3r"


def _model_fingerprint(overrides: dict) -> tuple:
    """(parameter names and shapes, the outputs after every parameter is set from one fixed stream):
    a key the network never reads leaves both as they are."""
    spec = resolve_model({"preset": TINY, **overrides})
    torch.manual_seed(0)
    model = build_model(spec).eval()
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised heads and gates would hide what the forward does
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        x = torch.randn((2, spec.in_channels, spec.image_size, spec.image_size), generator=g)
        out = model(x, torch.tensor([0.3, 0.7]), torch.tensor([1, 2]))
    return shapes, [o.clone() for o in out]


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(
        x.shape == y.shape and torch.allclose(x, y, atol=1e-5) for x, y in zip(a[1], b[1]))


def _branches(i: int, **kw) -> dict:
    """Override keys of branch i of the preset."""
    from dimr_lab.spec.presets import PRESETS

    out = [dict(b) for b in PRESETS[TINY]["branches"]]
    out[i].update(kw)
    return {"branches": out}


MODEL_CHANGES = {
    "in_channels": {"in_channels": 1},
    "out_channels": {"out_channels": 6},
    "image_size": {"image_size": 32},
    "num_classes": {"num_classes": 4},
    "conditioning": {"conditioning": "token"},
    "conditioning+time_embed_dim": {"conditioning": "adaln", "norm": "adaln", "outer_norm": "adaln"},
    "time_embed_dim(adaln)": {"conditioning": "adaln", "norm": "adaln", "outer_norm": "adaln", "time_embed_dim": 32},
    "norm": {"norm": "tdln"},
    "outer_norm": {"outer_norm": "tdrmsnorm"},
    "mlp": {"mlp": "mlp"},
    "pos_embed": {"pos_embed": "sincos"},
    "cascade": {"cascade": "none"},
    "head": {"head": "unpatchify_conv"},
    "long_skip": {"long_skip": False},
    "qkv_bias": {"qkv_bias": True},
    "branches.block": _branches(2, block="transformer", heads=2),
    "branches.width": _branches(1, width=32),
    "branches.depth": _branches(0, depth=2),
    "branches.heads": _branches(0, heads=2),
    "branches.mlp_width": _branches(1, mlp_width=64),
    "branches.patch": _branches(0, patch=8),
    "branches.downsample": _branches(0, downsample=2, patch=2),
    "branches.kernel": _branches(1, kernel=3),
    "branches.out_kernel": _branches(1, out_kernel=5),
}
# keys that by design compute the same network: a label, backends, memory
MODEL_SAME = {
    "name": {"name": "other"},
    "attention": {"attention": "math"},
    "attention_fp32": {"attention_fp32": True},  # float32 attention under autocast only (CPU: no autocast)
    "checkpointing": {"checkpointing": True},
}


@pytest.fixture(scope="module")
def base_model():
    return _model_fingerprint({})


@pytest.mark.parametrize("key", sorted(MODEL_CHANGES))
def test_each_model_key_changes_the_network(base_model, key):
    assert not _same(_model_fingerprint(MODEL_CHANGES[key]), base_model), key


@pytest.mark.parametrize("key", sorted(MODEL_SAME))
def test_model_keys_that_by_design_compute_the_same_network(base_model, key):
    assert _same(_model_fingerprint(MODEL_SAME[key]), base_model), key


def test_every_model_key_is_classified():
    from dataclasses import fields

    from dimr_lab.spec.model_spec import BranchSpec, ModelSpec

    named = {k.split("(")[0].split("+")[0] for k in [*MODEL_CHANGES, *MODEL_SAME]}
    want = {f.name for f in fields(ModelSpec) if f.name != "branches"} | {f"branches.{f.name}" for f in fields(BranchSpec)}
    assert want <= named, sorted(want - named)


# ---------------------------------------------------------------------------------- data, diffusion, train

_TRAINED: dict = {}


def _trained(tmp: Path, overrides: list) -> dict:
    """The weights and the EMA after two steps of the tiny run of test_train (update 0 runs at lr 0)."""
    from dimr_lab.train.trainer import train_run

    memo = repr((str(tmp), overrides))
    if memo in _TRAINED:
        return _TRAINED[memo]
    name = "run-" + "-".join(f"{k}={v}" for k, v in overrides).replace("/", "_").replace(" ", "")
    train_run(tiny_spec(tmp, steps=2, ckpt=2, overrides=overrides), tmp / name, progress=False)
    ckpt = torch.load(tmp / name / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    _TRAINED[memo] = {"model": ckpt["model"], "ema": ckpt["ema"]}
    return _TRAINED[memo]


def _differ(a: dict, b: dict, part: str) -> bool:
    return a[part].keys() != b[part].keys() or any(
        a[part][k].shape != b[part][k].shape or not torch.equal(a[part][k], b[part][k]) for k in a[part])


VP = [("diffusion.schedule", "vp_linear"), ("diffusion.time_input", "vp_logsnr")]
COSINE = [("train.lr_schedule", "cosine"), ("train.warmup_steps", 0)]
# (base overrides, the change): the change must move the trained weights (the EMA for the EMA keys)
TRAIN_CHANGES = {
    "data.num_classes": ([], [("data.num_classes", 4)]),
    "data.train_size": ([], [("data.train_size", 64)]),
    "data.shape_size": ([], [("data.shape_size", [0.3, 0.4])]),
    "data.shape_palette": ([], [("data.shape_palette", "random")]),
    "data.shape_jitter": ([], [("data.shape_jitter", 0.8)]),
    "data.texture": ([], [("data.texture", "stripes")]),
    "data.texture_period": ([("data.texture", "stripes")], [("data.texture_period", 5.0)]),
    "data.flip": ([], [("data.flip", False)]),
    "data.image_size": ([], [("model.image_size", 32), ("data.image_size", 32)]),
    "diffusion.schedule": ([], [("diffusion.schedule", "cosine")]),
    "diffusion.num_steps": ([], [("diffusion.num_steps", 500)]),
    "diffusion.beta_min": (VP, [("diffusion.beta_min", 0.5)]),
    "diffusion.beta_max": (VP, [("diffusion.beta_max", 10.0)]),
    "diffusion.time_input": ([], [("diffusion.time_input", "vp_logsnr")]),
    "diffusion.multiscale_loss": ([], [("diffusion.multiscale_loss", False)]),
    "diffusion.loss_weights": ([], [("diffusion.loss_weights", [1.0, 1.0])]),
    "diffusion.label_drop": ([], [("diffusion.label_drop", 0.6)]),
    "train.batch_size": ([], [("train.batch_size", 4)]),
    "train.lr": ([], [("train.lr", 3e-3)]),
    "train.lr_schedule": ([("train.warmup_steps", 0)], [("train.lr_schedule", "cosine")]),
    "train.lr_min": (COSINE, [("train.lr_min", 5e-4)]),
    "train.steps(cosine)": (COSINE, [("train.steps", 3)]),  # compared at step 2: the decay reads the total
    "train.betas": ([], [("train.betas", [0.5, 0.9])]),
    "train.weight_decay": ([], [("train.weight_decay", 5.0)]),
    "train.no_decay": ([("train.weight_decay", 5.0)], [("train.no_decay", "none")]),
    "train.no_decay(td_only)": ([("train.weight_decay", 5.0)], [("train.no_decay", "td_only")]),
    "train.warmup_steps": ([], [("train.warmup_steps", 1)]),
    "train.ema_decay": ([], [("train.ema_decay", 0.5)]),
    "train.ema_warmup": ([], [("train.ema_warmup", True)]),
    "train.grad_clip": ([], [("train.grad_clip", 1e-3)]),
    "train.seed": ([], [("train.seed", 1)]),
    "train.init_draws": ([], [("train.init_draws", "by_name")]),
}
# keys that by design train the same weights on the CPU
TRAIN_SAME = {
    "train.activation_checkpointing": [("train.activation_checkpointing", True)],
    "train.precision": [("train.precision", "bf16")],  # autocast dtype on GPUs only (help text)
    "data.num_workers": [("data.num_workers", 1)],  # loads the items only; the trainer draws the flips
    **{f"train.{k}": [(f"train.{k}", v)] for k, v in
       [("checkpoint_every", 1), ("log_every", 2), ("threads", 1), ("keep_every", 1), ("keep_checkpoints", [1]),
        ("time_limit_s", 3600.0)]},
}
# train.compile: tested against eager training in test_train (needs a C++ compiler); model keys: above


@pytest.fixture(scope="module")
def trained_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("effects")


@pytest.mark.parametrize("key", sorted(TRAIN_CHANGES))
def test_each_data_diffusion_and_train_key_changes_what_is_trained(trained_tmp, key):
    base, change = TRAIN_CHANGES[key]
    if key == "train.steps(cosine)":  # the same two steps, of a 2- and a 3-step decay
        from dimr_lab.train.trainer import train_run

        run = trained_tmp / "three"
        train_run(tiny_spec(trained_tmp, steps=3, ckpt=2, overrides=base + [("train.keep_checkpoints", [2])]), run,
                  progress=False)
        ck = torch.load(sorted((run / "checkpoints").glob("*2*.pt"))[0], map_location="cpu", weights_only=True)
        assert int(ck["step"]) == 2
        assert _differ(_trained(trained_tmp, base), {"model": ck["model"], "ema": ck["ema"]}, "model")
        return
    part = "ema" if key.startswith("train.ema") else "model"
    assert _differ(_trained(trained_tmp, base), _trained(trained_tmp, base + change), part), key


@pytest.mark.parametrize("key", sorted(TRAIN_SAME))
def test_keys_that_by_design_train_the_same_weights(trained_tmp, key):
    a, b = _trained(trained_tmp, []), _trained(trained_tmp, TRAIN_SAME[key])
    assert not _differ(a, b, "model") and not _differ(a, b, "ema"), key


def test_every_run_key_is_classified():
    """Each key of model/data/diffusion/train is either shown to change the weights or listed as not."""
    from dataclasses import fields

    from dimr_lab.spec.run_spec import DataSpec, DiffusionSpec, TrainSpec

    named = {k.split("(")[0] for k in [*TRAIN_CHANGES, *TRAIN_SAME]}
    named |= {"train.compile", "diffusion.prediction"}  # see above; prediction: one choice
    named |= {"data.name", "data.root", "data.vae", "train.steps"}  # datasets: test_components; steps: the loop
    want = {f"{s}.{f.name}" for s, cls in (("data", DataSpec), ("diffusion", DiffusionSpec), ("train", TrainSpec))
            for f in fields(cls)}
    assert want <= named, sorted(want - named)
    outside = {f"{s}.{k}" for s, keys in OUTSIDE_IDENTITY.items() for k in keys}
    assert outside <= set(TRAIN_SAME)


# --------------------------------------------------------------------------------------------- sampling

SAMPLE_BASE = [("sample.steps", 4), ("sample.guidance_scale", 0.0)]  # the built-in default guides at 3
GUIDED = [("sample.guidance_scale", 1.0)]
# (base overrides, the change): the change must move the samples generate() makes (eval.run's sampler call)
SAMPLE_CHANGES = {
    "sample.sampler": ([], [("sample.sampler", "dpm_solver++_fast")]),
    "sample.sampler(ddim)": ([], [("sample.sampler", "ddim"), ("sample.order", 1)]),
    "sample.sampler(dpm_solver_fast)": ([], [("sample.sampler", "dpm_solver_fast")]),
    "sample.steps": ([], [("sample.steps", 3)]),
    "sample.order": ([], [("sample.order", 1)]),
    "sample.order(fast)": ([("sample.sampler", "dpm_solver_fast"), ("sample.steps", 6)], [("sample.order", 3)]),  # the default order is 2
    "sample.skip_type": ([], [("sample.skip_type", "logSNR")]),
    "sample.skip_type(++_fast)": ([("sample.sampler", "dpm_solver++_fast")], [("sample.skip_type", "logSNR")]),
    "sample.order(++_fast)": ([("sample.sampler", "dpm_solver++_fast"), ("sample.steps", 6)], [("sample.order", 3)]),
    "sample.t_end": ([], [("sample.t_end", 0.05)]),
    "sample.guidance_scale": ([], GUIDED),
    "sample.guidance_form": ([], [("sample.guidance_form", "dit")]),  # dit at 0: the unconditional model
    "sample.guidance_schedule": (GUIDED, [("sample.guidance_schedule", "power_cosine")]),
    "sample.guidance_power": (GUIDED + [("sample.guidance_schedule", "power_cosine")], [("sample.guidance_power", 3.0)]),
    "sample.seed": ([], [("sample.seed", 1)]),
    # the run's diffusion process, which the sampler integrates backwards
    "diffusion.schedule": ([], [("diffusion.schedule", "cosine")]),
    "diffusion.num_steps": ([], [("diffusion.num_steps", 500)]),
    "diffusion.time_input": ([], [("diffusion.time_input", "vp_logsnr")]),
    "diffusion.beta_min": (VP, [("diffusion.beta_min", 0.5)]),
    "diffusion.beta_max": (VP, [("diffusion.beta_max", 10.0)]),
}


@pytest.fixture(scope="module")
def sampling_model():
    model = build_model("dimr_tiny_2r").eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():  # away from the zero-initialised heads: eps depends on x, t and y
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _samples(model, overrides: list) -> torch.Tensor:
    from dimr_lab.eval.sampling import generate
    from dimr_lab.spec.run_spec import load_run_spec

    spec = load_run_spec(None, [("model", "dimr_tiny_2r"), *SAMPLE_BASE, *overrides])
    return generate(model, spec, np.arange(2), torch.tensor([0, 1]))


@pytest.mark.parametrize("key", sorted(SAMPLE_CHANGES))
def test_each_sample_and_diffusion_key_changes_the_samples(sampling_model, key):
    base, change = SAMPLE_CHANGES[key]
    assert not torch.equal(_samples(sampling_model, base), _samples(sampling_model, base + change)), key


def test_sample_use_ema_picks_the_averaged_weights(trained_tmp):
    """sample.use_ema reaches the weights an evaluation loads (eval.run: load_run_model(ema=use_ema))."""
    from dimr_lab.eval.sampling import load_run_model

    _trained(trained_tmp, [])
    run = next(p for p in trained_tmp.iterdir() if p.name == "run-")
    ema, _, _ = load_run_model(run, ema=True)
    raw, _, _ = load_run_model(run, ema=False)
    assert any(not torch.equal(a, b) for a, b in zip(ema.state_dict().values(), raw.state_dict().values()))


def test_every_sample_key_is_classified():
    from dataclasses import fields

    from dimr_lab.spec.run_spec import SampleSpec

    named = {k.split("(")[0] for k in SAMPLE_CHANGES if k.startswith("sample.")} | {"sample.use_ema"}
    named |= {f"sample.{k}" for k in OUTSIDE_EVAL_IDENTITY["sample"]}  # grid_size: the picture only
    assert {f"sample.{f.name}" for f in fields(SampleSpec)} <= named


# ------------------------------------------------------------------------------------------- evaluation

class _FakeClassifier(torch.nn.Module):
    """Stands in for the dataset classifier: class probabilities from the images' pixels, no training."""

    num_classes, accuracy, path, epochs, digest = 8, 1.0, Path("fake.pt"), None, "fake"

    def predict_proba(self, images, batch_size=500):
        logits = images.float().flatten(1)[:, :8] / 64.0  # (N, 8)
        return logits.softmax(-1)


def _evaluation(monkeypatch, **eval_keys) -> tuple:
    """(evaluate()'s results without arrays, the calls it made to the classifier and torch-fidelity)."""
    import torch_fidelity

    from dimr_lab.eval import classifier as clf
    from dimr_lab.eval import metrics
    from dimr_lab.spec.run_spec import DataSpec, EvalSpec

    calls = []
    monkeypatch.setattr(clf, "get_classifier", lambda data, cache, seed=0, max_images=None, log=None:
                        calls.append(("classifier", max_images)) or _FakeClassifier())
    monkeypatch.setattr(metrics, "_extractor", lambda ev, model: (ev.feature_extractor, ev.inception_weights))

    def fidelity(input1, input2=None, **kw):
        calls.append(("fidelity", len(input1), len(input2) if input2 is not None else None,
                      sorted((k, v) for k, v in kw.items() if k not in ("cuda", "verbose"))))
        out = {}  # what torch-fidelity returns: the computations asked for
        if kw.get("fid"):
            out[torch_fidelity.KEY_METRIC_FID] = float(len(input2))
        if kw.get("isc"):
            out.update({torch_fidelity.KEY_METRIC_ISC_MEAN: 1.0, torch_fidelity.KEY_METRIC_ISC_STD: 0.0})
        if kw.get("kid"):
            out.update({torch_fidelity.KEY_METRIC_KID_MEAN: float(kw["kid_subset_size"]),
                        torch_fidelity.KEY_METRIC_KID_STD: 0.0})
        if kw.get("prc"):
            out.update({torch_fidelity.KEY_METRIC_PRECISION: 0.5, torch_fidelity.KEY_METRIC_RECALL: 0.5,
                        torch_fidelity.KEY_METRIC_F_SCORE: float(len(input2))})
        return out

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", fidelity)
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(0, 256, (16, 3, 16, 16), generator=g, dtype=torch.uint8)
    keys = {"samples": 16, "kid_subset_size": 100, **eval_keys}
    data = DataSpec(name="shapes", image_size=16, train_size=64)
    out = metrics.evaluate(samples, torch.arange(16) % 8, data, EvalSpec(**keys), cache_dir="unused")
    return {k: v for k, v in out.items() if not isinstance(v, np.ndarray)}, calls


# (the base keys, the change): evaluate() must compute or report something else
EVAL_CHANGES = {
    "eval.metrics": ({}, {"metrics": ["fid", "isc"]}),
    "eval.classifier": ({}, {"classifier": False, "feature_extractor": "inception-v3-compat",
                             "metrics": ["fid", "kid", "isc", "prc"]}),
    "eval.classifier_images": ({}, {"classifier_images": 64}),  # reaches get_classifier (its cap: test_eval)
    "eval.distortion_threshold": ({}, {"distortion_threshold": 0.13}),
    "eval.kid_subset_size": ({}, {"kid_subset_size": 4}),
    "eval.reference_samples": ({}, {"reference_samples": 8}),
    "eval.feature_extractor": ({}, {"feature_extractor": "inception-v3-compat"}),
}


@pytest.mark.parametrize("key", sorted(EVAL_CHANGES))
def test_each_eval_key_changes_what_evaluate_computes(monkeypatch, key):
    base, change = EVAL_CHANGES[key]
    assert _evaluation(monkeypatch, **base) != _evaluation(monkeypatch, **base, **change), key


def test_every_eval_key_is_classified():
    """eval.samples and eval.labels name the samples (test_sample_reuse samples anew for other ones, and
    test_eval's frequency labels); eval.reference_stats and eval.inception_weights: test_eval's Inception
    tests (the weights' digest and the statistics reach the results)."""
    from dataclasses import fields

    from dimr_lab.spec.run_spec import EvalSpec

    named = set(EVAL_CHANGES) | {"eval.samples", "eval.labels", "eval.reference_stats",
                                "eval.inception_weights"}
    named |= {f"eval.{k}" for k in OUTSIDE_EVAL_IDENTITY["eval"]}  # enabled, batch_size, compile, steps
    assert {f"eval.{f.name}" for f in fields(EvalSpec)} <= named


# -------------------------------------------------------------------------------------------- data.flip

def test_data_flip_is_read_by_pixel_datasets_only_and_its_help_says_so(tmp_path):
    """A latents dataset holds each image's flip (prepare-latents bakes them in) and the trainer flips pixel
    images only: data.flip names another run of the same weights there. Its help said "random horizontal flips"
    with no word of that."""
    from dimr_lab.spec.run_spec import DataSpec, load_run_spec
    from dimr_lab.train.trainer import train_run

    root = tmp_path / "lat"
    root.mkdir()
    g = np.random.default_rng(0)
    for i in range(8):  # left-right asymmetric latents: a flip would show (moments: mean, log-variance)
        moments = np.concatenate([g.normal(size=(4, 8, 8)), np.full((4, 8, 8), -4.0)]).astype(np.float32)
        np.save(root / f"{i}.npy", np.array((moments, i % 2), dtype=object), allow_pickle=True)

    def weights(flip: bool) -> dict:
        spec = load_run_spec({
            "model": {"preset": "dimr_tiny_2r", "in_channels": 4, "image_size": 8, "num_classes": 2,
                      "branches": [{"width": 32, "depth": 2, "heads": 2, "patch": 2}, {"width": 16, "depth": 1}]},
            "data": {"name": "latents", "root": str(root), "image_size": 8, "num_classes": 2, "flip": flip},
            "train": {"steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "checkpoint_every": 2},
            "eval": {"enabled": False, "classifier": False, "feature_extractor": "inception-v3-compat",
                     "metrics": ["fid"]}})
        train_run(spec, tmp_path / f"run-{flip}", progress=False, evaluate=False)
        return torch.load(tmp_path / f"run-{flip}" / "checkpoints" / "last.pt", weights_only=True)["model"]

    a, b = weights(True), weights(False)
    assert all(torch.equal(a[k], b[k]) for k in a)
    help_text = DataSpec.__dataclass_fields__["flip"].metadata["help"]
    assert "pixel" in help_text and "latents" in help_text, help_text


# ------------------------------------------------------------------------------------------ scoped keys

def _help(dotted: str) -> str:
    from dimr_lab.spec.model_spec import BranchSpec, ModelSpec
    from dimr_lab.spec.run_spec import DataSpec, DiffusionSpec, EvalSpec, SampleSpec, TrainSpec

    section, name = dotted.rsplit(".", 1)
    cls = {"model": ModelSpec, "model.branches": BranchSpec, "data": DataSpec, "diffusion": DiffusionSpec,
           "train": TrainSpec, "sample": SampleSpec, "eval": EvalSpec}[section]
    return cls.__dataclass_fields__[name].metadata.get("help", "")


# keys a component reads and others do not: outside their scope they change no number, yet name another run
# or evaluation; each help text says where it applies ((key, a word its help must hold) -> how to check)
SCOPED = {
    ("model.time_embed_dim", "adaln"): ("model", {}, {"time_embed_dim": 32}),  # norm conditioning
    ("model.branches.kernel", "convnext"): ("model", {}, _branches(0, kernel=3)),  # a transformer branch
    ("model.branches.heads", "attention"): ("model", {}, _branches(1, heads=2)),  # a convnext branch
    ("model.branches.out_kernel", "unpatchify"): ("model", {"head": "unpatchify"}, _branches(1, out_kernel=5)),
    ("diffusion.num_steps", "discrete"): ("train", VP, [("diffusion.num_steps", 500)]),
    ("diffusion.beta_min", "vp_linear"): ("train", [], [("diffusion.beta_min", 0.5)]),
    ("diffusion.beta_max", "vp_linear"): ("train", [], [("diffusion.beta_max", 10.0)]),
    ("train.lr_min", "cosine"): ("train", [("train.warmup_steps", 0)], [("train.lr_min", 5e-4)]),
    ("train.precision", "GPU"): ("train", [], [("train.precision", "fp16")]),
    ("sample.guidance_power", "constant"): ("sample", GUIDED, [("sample.guidance_power", 3.0)]),
    ("sample.guidance_schedule", "unguided"): ("sample", [], [("sample.guidance_schedule", "power_cosine")]),
    ("eval.kid_subset_size", "kid"): ("eval", {"metrics": ["fid", "isc"]}, {"kid_subset_size": 4}),
    ("eval.reference_samples", "fid"): ("eval", {"metrics": ["isc", "sample_accuracy"]}, {"reference_samples": 8}),
}


@pytest.mark.parametrize("key,word", sorted(SCOPED))
def test_scoped_keys_change_nothing_outside_their_scope_and_their_help_says_where(
        key, word, base_model, trained_tmp, sampling_model, monkeypatch):
    how, base, change = SCOPED[key, word]
    if how == "model":
        same = _same(_model_fingerprint(base), _model_fingerprint({**base, **change}))
    elif how == "train":
        a, b = _trained(trained_tmp, base), _trained(trained_tmp, base + change)
        same = not _differ(a, b, "model") and not _differ(a, b, "ema")
    elif how == "sample":
        same = torch.equal(_samples(sampling_model, base), _samples(sampling_model, base + change))
    else:
        same = _evaluation(monkeypatch, **base)[0] == _evaluation(monkeypatch, **base, **change)[0]
    assert same, f"{key} changed numbers outside its scope"
    assert word.lower() in _help(key).lower(), (key, _help(key))
