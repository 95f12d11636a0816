"""Every registered component of a run (datasets, schedules, time inputs, samplers, extractors, metrics,
learning-rate schedules) exercised at tiny size; the network's components are in test_models.py. A newly
registered name without a case here fails `test_every_entry_has_a_case`."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from dimr_lab.registry import (DATASETS, EXTRACTORS, KINDS, LR_SCHEDULES, METRICS, SAMPLERS, SCHEDULES,
                               TIME_INPUTS)
from dimr_lab.spec.run_spec import DataSpec, DiffusionSpec, EvalSpec, TrainSpec


def _folder(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "tree" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 24, 3), 40 * i + (100 if c == "dog" else 0), np.uint8)).save(
                tmp_path / "tree" / c / f"{i}.png")
    return DataSpec(name="folder", root=str(tmp_path / "tree"), image_size=16)


def _latents(tmp_path):
    root = tmp_path / "latents"
    root.mkdir()
    for i in range(4):
        np.save(root / f"{i}.npy", np.array((np.zeros((8, 4, 4), np.float32), i % 2), dtype=object),
                allow_pickle=True)
    return DataSpec(name="latents", root=str(root), num_classes=2, image_size=4)


DATA_CASES = {
    "shapes": lambda tmp: DataSpec(name="shapes", image_size=16, train_size=16),
    "digits": lambda tmp: DataSpec(name="digits", image_size=16),
    "folder": _folder,
    "latents": _latents,
}


def test_every_entry_has_a_case():
    cases = {"dataset": DATA_CASES, "schedule": SCHEDULES.names(), "time_input": TIME_INPUTS.names(),
             "sampler": SAMPLERS.names(), "feature_extractor": EXTRACTOR_CASES, "metric": METRICS.names(),
             "lr_schedule": LR_SCHEDULES.names()}
    for kind, registry in KINDS.items():
        if registry.group == "run":
            assert set(registry.names()) <= set(cases[kind]), f"add a test case for every {kind}"


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_yields_items_its_registry_entry_describes(name, tmp_path):
    from dimr_lab.data import build_dataset, dataset_identity

    spec = DATA_CASES[name](tmp_path)
    entry = DATASETS.entry(name)
    ds = build_dataset(spec, split="train")
    x, y = ds[0]
    assert x.dim() == 3 and 0 <= int(y) < ds.num_classes
    assert x.shape[0] == (entry["channels"] or x.shape[0]) and getattr(ds, "kind", "pixels") == entry["kind"]
    if entry["classes"]:
        assert ds.num_classes == entry["classes"]
    ident = dataset_identity(spec)
    assert {k.split(".", 1)[1] for k in entry.keys} <= set(ident)  # the keys it reads identify it


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_every_schedule_is_a_vp_process(name):
    from dimr_lab.diffusion.schedule import build_schedule

    sch = build_schedule(DiffusionSpec(schedule=name, num_steps=100))
    assert bool(getattr(sch, "continuous", False)) == SCHEDULES.meta(name, "continuous")
    t = sch.sample_time(512, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float64 and float(t.min()) >= 0 and float(t.max()) <= 1
    tt = torch.linspace(0.05, 1.0, 20, dtype=torch.float64)
    a, s = sch.marginal_alpha(tt), sch.marginal_std(tt)
    torch.testing.assert_close(a ** 2 + s ** 2, torch.ones_like(tt))
    assert bool((a.diff() < 0).all())  # noisier with time
    torch.testing.assert_close(sch.inverse_lambda(sch.marginal_lambda(tt)), tt, atol=1e-6, rtol=1e-6)
    x0, eps = torch.randn(512, 2), torch.randn(512, 2)
    xt = sch.add_noise_at(x0, eps, t)
    at, st = sch.marginal_alpha(t).float()[:, None], sch.marginal_std(t).float()[:, None]
    torch.testing.assert_close(xt, at * x0 + st * eps, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", TIME_INPUTS.names())
def test_every_time_input_drives_a_network(name):
    from dimr_lab.diffusion.schedule import build_schedule
    from dimr_lab.nn.network import build_model

    for sched in SCHEDULES.names():
        sch = build_schedule(DiffusionSpec(schedule=sched, num_steps=100))
        t = sch.sample_time(4, torch.Generator().manual_seed(1))
        t_net, tau = TIME_INPUTS.get(name)(sch, t)
        assert t_net.dtype == torch.float32 and t_net.shape == (4,) and float(t_net.max()) <= 1
        assert tau is None or (tau.shape == (4,) and bool(torch.isfinite(tau).all()))
        model = build_model({"preset": "dimr_tiny_2r", "branches": [{"width": 16, "depth": 1, "heads": 2},
                                                                     {"width": 8, "depth": 1}]})
        out = model(torch.randn(4, 3, 16, 16), t_net, torch.zeros(4, dtype=torch.long), tau=tau)
        assert all(bool(torch.isfinite(o).all()) for o in out)


def _eps_model():
    w = torch.randn(3, 3, 3, 3, generator=torch.Generator().manual_seed(2)) * 0.3
    calls = []

    def fn(x, t, y, tau=None):
        calls.append(len(x))
        return [torch.tanh(torch.nn.functional.conv2d(x, w, padding=1)) + 0.1 * t.view(-1, 1, 1, 1)
                + 0.05 * y.float().view(-1, 1, 1, 1)]

    return fn, calls


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_runs_on_every_schedule_it_takes(name):
    from dimr_lab.diffusion.samplers import sample
    from dimr_lab.diffusion.schedule import build_schedule

    for sched in SCHEDULES.names():
        if SAMPLERS.meta(name, "needs_discrete") and SCHEDULES.meta(sched, "continuous"):
            continue
        sch = build_schedule(DiffusionSpec(schedule=sched, num_steps=100))
        fn, calls = _eps_model()
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
        order = max(SAMPLERS.meta(name, "orders"))
        out = sample(fn, x, torch.zeros(2, dtype=torch.long), sampler=name, steps=9, order=order, schedule=sch,
                     t_end=1e-2, time_input="discrete")
        assert out.shape == x.shape and bool(torch.isfinite(out).all())
        assert len(calls) == 9, f"{name} on {sched}: {len(calls)} network calls for 9 steps"
        fn2, calls2 = _eps_model()
        guided = sample(fn2, x, torch.zeros(2, dtype=torch.long), sampler=name, steps=9, order=order, schedule=sch,
                        t_end=1e-2, guidance_scale=1.0, null_label=5)
        assert calls2 == [4] * 9 and not torch.equal(guided, out)  # cond + uncond in one batch


@pytest.fixture(scope="module")
def shapes_eval(tmp_path_factory):
    from dimr_lab.data import build_dataset

    data = DataSpec(name="shapes", image_size=16, train_size=512)
    cache = tmp_path_factory.mktemp("cache")
    real = build_dataset(dataclasses.replace(data, train_size=96), split="train")
    return data, cache, real.images, real.labels


EXTRACTOR_CASES = {"classifier": None, "inception-v3-compat": None}


@pytest.mark.parametrize("name", EXTRACTORS.names())
def test_every_feature_extractor_resolves_without_downloads(name, tmp_path, shapes_eval):
    from dimr_lab.errors import SpecError, UserError
    from dimr_lab.eval import get_classifier

    fn = EXTRACTORS.get(name)
    if name == "classifier":
        data, cache, _, _ = shapes_eval
        model = get_classifier(data, cache)  # the module's classifier (trained here if this test comes first)
        extractor, weights = fn(EvalSpec(), model)
        assert extractor == "dimr-classifier" and weights == str(model.path)
        with pytest.raises(SpecError):
            fn(EvalSpec(), None)
    else:
        with pytest.raises(UserError, match="download"):
            fn(EvalSpec(feature_extractor=name), None)
        weights = tmp_path / "w.pth"
        weights.write_bytes(b"x")
        assert fn(EvalSpec(feature_extractor=name, inception_weights=str(weights)), None) == (name, str(weights))


@pytest.mark.parametrize("name", METRICS.names())
def test_every_metric_is_computed_and_real_images_beat_noise(name, shapes_eval):
    from dimr_lab.eval import evaluate

    data, cache, images, labels = shapes_eval
    spec = EvalSpec(samples=96, batch_size=48, kid_subset_size=32, metrics=[name])
    good = evaluate(images, labels, data, spec, cache_dir=cache)
    noise = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    bad = evaluate(noise, labels, data, spec, cache_dir=cache)
    key = {"kid": "kid_mean", "isc": "isc_mean", "prc": "precision"}.get(name, name)
    assert math.isfinite(good[key]) and math.isfinite(bad[key])
    if name == "fid_floor":  # a property of the evaluation, not of the samples
        assert good[key] == bad[key] and good[key] < 20
    elif name in ("fid", "kid", "distortion_rate"):
        assert good[key] < bad[key]
    else:
        assert good[key] > bad[key]


@pytest.mark.parametrize("name", LR_SCHEDULES.names())
def test_every_lr_schedule_warms_up_and_says_whether_it_reads_the_total(name):
    fn = LR_SCHEDULES.get(name)
    tr = TrainSpec(lr=1e-3, warmup_steps=10, steps=100, lr_min=1e-5, lr_schedule=name)
    assert fn(0, tr) == 0.0 and fn(10, tr) == pytest.approx(1e-3)
    longer = dataclasses.replace(tr, steps=1000)
    reads_total = any(fn(s, tr) != fn(s, longer) for s in range(0, 100, 7))
    assert reads_total == LR_SCHEDULES.meta(name, "uses_total")
    if name == "cosine":
        assert fn(100, tr) == pytest.approx(1e-5) and fn(55, tr) == pytest.approx((1e-3 + 1e-5) / 2)
