"""Evaluation: the cached classifier, its torch-fidelity registration, metrics on real vs noise, errors."""

from __future__ import annotations

import hashlib

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from dimr_lab.data import build_dataset
from dimr_lab.errors import SpecError, UserError
from dimr_lab.eval import evaluate, get_classifier
from dimr_lab.eval import classifier as clf
from dimr_lab.spec.run_spec import DataSpec, EvalSpec

DATA = DataSpec(name="shapes", image_size=16, train_size=2048)  # 16 px: the classifier trains in seconds
N = 300


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache dir holding the shapes classifier, trained once for the module."""
    path = tmp_path_factory.mktemp("cache")
    get_classifier(DATA, path)
    return path


@pytest.fixture(scope="module")
def real():
    """Disjoint real images: the train split (samples) and the test split (references)."""
    train = build_dataset(replace(DATA, flip=False), split="train")
    return train.images[:N], train.labels[:N]


def fast_eval(**kw):
    return EvalSpec(samples=N, batch_size=100, kid_subset_size=50, **kw)


def test_classifier_accuracy_and_cache(cache, monkeypatch):
    model = get_classifier(DATA, cache)
    assert model.accuracy > 0.95, f"held-out accuracy {model.accuracy:.3f}"
    assert model.path.parent == cache and model.identity["name"] == "shapes"
    # loaded from the cache, never retrained: training would now raise
    monkeypatch.setattr(clf, "train_classifier", lambda *a, **k: pytest.fail("retrained a cached classifier"))
    again = get_classifier(DATA, cache)
    assert again.accuracy == model.accuracy
    # the digest metrics.json records names the weights: the same after loading, another for other weights
    assert len(model.digest) == 12 and again.digest == model.digest == clf.weights_digest(again)
    other = clf.SmallCNN(model.num_classes, model.resolution)
    assert clf.weights_digest(other) != model.digest
    for a, b in zip(again.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert clf.cache_path(replace(DATA, train_size=1024), cache) != model.path, "the identity keys the cache"


def test_corrupt_cache_is_rebuilt_not_used(cache, tmp_path, monkeypatch):
    path = clf.cache_path(DATA, tmp_path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="unusable classifier cache"):
        clf.load_classifier_file(path)
    calls = []

    def fake_train(data_spec, seed=0, **kw):
        calls.append(data_spec)
        m = clf.SmallCNN(8, 16)
        m.accuracy, m.train_seconds = 0.5, 0.0
        return m

    monkeypatch.setattr(clf, "train_classifier", fake_train)
    with pytest.warns(UserWarning, match="unusable classifier cache.*retraining"):
        model = get_classifier(DATA, tmp_path)
    assert len(calls) == 1 and model.accuracy == 0.5
    assert clf.load_classifier_file(path).accuracy == 0.5, "the rebuilt file replaced the corrupt one"
    # a valid file of another dataset is refused too
    with pytest.raises(UserError, match="another dataset"):
        clf.load_classifier_file(path, {"name": "digits"})


def test_extractor_registered_with_torch_fidelity(cache):
    from torch_fidelity import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor

    from dimr_lab.eval import register_feature_extractor

    name = register_feature_extractor()
    assert register_feature_extractor() == name == "dimr-classifier"  # idempotent
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    assert issubclass(cls, FeatureExtractorBase)
    assert cls.get_default_feature_layer_for_metric("fid") == "penultimate"
    assert cls.get_default_feature_layer_for_metric("isc") == "logits"
    fe = create_feature_extractor(name, ["penultimate", "logits"], cuda=False,
                                  feature_extractor_weights_path=str(get_classifier(DATA, cache).path))
    feats, logits = fe(torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8))
    assert feats.shape == (5, 128) and logits.shape == (5, 8)
    with pytest.raises(ValueError, match="uint8"):
        fe(torch.zeros(2, 3, 16, 16))


def test_real_vs_real_and_noise(cache, real):
    images, labels = real
    res = evaluate(images, labels, DATA, fast_eval(), cache_dir=cache)
    noise = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    bad = evaluate(noise, labels, DATA, fast_eval(), cache_dir=cache)
    for r in (res, bad):
        assert r["feature_extractor"] == "classifier" and r["torch_fidelity_extractor"] == "dimr-classifier"
        assert r["num_samples"] == N and r["num_real"] == N and r["reference"] == "test split"
        assert r["class_prob"].shape == (N,) and r["pred"].shape == (N,) and r["kid_subset_size"] == 50
        assert set(r) >= {"fid", "kid_mean", "kid_std", "isc_mean", "isc_std", "precision", "recall"}
        assert r["classifier_digest"] == get_classifier(DATA, cache).digest  # the instrument, for table
    assert res["fid"] < 5 and bad["fid"] > 100 * max(res["fid"], 0.1)
    assert abs(res["kid_mean"]) < bad["kid_mean"] / 100
    assert res["precision"] > 0.8 and res["recall"] > 0.8 and bad["precision"] < 0.1
    assert res["isc_mean"] > 5 and bad["isc_mean"] < 2  # 8 classes: at most 8
    assert res["sample_accuracy"] > 0.95 and bad["sample_accuracy"] < 0.3
    assert res["distortion_rate"] < 0.05 and bad["distortion_rate"] > 0.6
    assert res["distortion_rate"] == pytest.approx(float((res["class_prob"] < 0.5).mean()))
    # wrong labels: the same images now count as distorted
    shifted = evaluate(images, (labels + 1) % 8, DATA, fast_eval(metrics=["isc"]), cache_dir=cache)
    assert shifted["sample_accuracy"] < 0.05 and shifted["distortion_rate"] > 0.9
    assert "fid" not in shifted and shifted["num_real"] == 0


def test_given_real_images_and_grey(cache, real):
    images, labels = real
    res = evaluate(images[:100], labels[:100], DATA, fast_eval(metrics=["fid", "kid"]), cache_dir=cache,
                   real_images=images[100:200])
    assert res["reference"] == "given" and res["num_real"] == 100 and "isc_mean" not in res
    grey = images[:100].float().mean(1, keepdim=True).to(torch.uint8)  # (100, 1, 16, 16)
    assert evaluate(grey, labels[:100], DATA, fast_eval(metrics=["isc"]), cache_dir=cache)["num_samples"] == 100


def test_bad_inputs(cache, real):
    images, labels = real
    with pytest.raises(UserError, match="uint8"):
        evaluate(images.float(), labels, DATA, fast_eval(), cache_dir=cache)
    with pytest.raises(UserError, match="labels"):
        evaluate(images, labels[:10], DATA, fast_eval(), cache_dir=cache)
    with pytest.raises(SpecError, match="eval.metrics"):
        evaluate(images, labels, DATA, fast_eval(metrics=["fd"]), cache_dir=cache)
    with pytest.raises(SpecError, match="eval.reference_stats"):
        evaluate(images, labels, DATA, fast_eval(reference_stats="ref.npz"), cache_dir=cache)


def test_missing_inception_weights(cache, real, tmp_path):
    images, labels = real
    with pytest.raises(UserError, match="eval.inception_weights is empty"):
        evaluate(images, labels, DATA, fast_eval(feature_extractor="inception-v3-compat"), cache_dir=cache)
    with pytest.raises(SpecError, match="eval.inception_weights.*not found"):
        evaluate(images, labels, DATA, fast_eval(feature_extractor="inception-v3-compat",
                                                 inception_weights=str(tmp_path / "none.pth")), cache_dir=cache)


@pytest.mark.slow
def test_inception_with_local_weights_and_reference_stats(cache, real, tmp_path, monkeypatch):
    """The inception path end to end with randomly initialised weights saved locally (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    with monkeypatch.context() as m:  # build the network once without its pretrained weights
        m.setattr(inc, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, **k: None)
        torch.manual_seed(0)
        net = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    images, labels = real
    spec = fast_eval(feature_extractor="inception-v3-compat", inception_weights=str(weights),
                     reference_stats=str(ref), metrics=["fid"])
    from dimr_lab.eval.extractors import check_inception_weights

    check_inception_weights(spec)  # what an evaluation checks before it samples: these weights load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = evaluate(images[:6], labels[:6], DATA, spec, cache_dir=cache)
    assert res["torch_fidelity_extractor"] == "inception-v3-compat" and res["reference"] == f"reference_stats:{ref}"
    assert np.isfinite(res["fid"]) and res["fid"] > 0 and res["num_real"] == 0
    assert "sample_accuracy" in res, "the classifier still judges the samples"
    # what measured it, by content: the evaluation's name holds only the two paths
    assert res["extractor_digest"] == hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    assert res["reference_digest"] == hashlib.sha256(ref.read_bytes()).hexdigest()[:12]
    np.savez(ref, mu=np.ones(2048), sigma=np.eye(2048))  # another reference batch at the same path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = evaluate(images[:6], labels[:6], DATA, spec, cache_dir=cache)
    assert again["reference_digest"] == hashlib.sha256(ref.read_bytes()).hexdigest()[:12] != res["reference_digest"]
    assert again["extractor_digest"] == res["extractor_digest"]


def test_inception_score_of_few_samples_is_not_one_image_per_split(cache, real):
    """With under 100 samples IS takes fewer splits: ten split into one image each would score exactly 1."""
    images, labels = real
    res = evaluate(images[:12], labels[:12], DATA, EvalSpec(samples=12, batch_size=12, metrics=["isc"]),
                   cache_dir=cache)
    assert res["isc_mean"] > 3  # 12 real images of 8 classes, one split


def test_classifier_cache_names_the_image_cap_and_records_its_epochs(cache, tmp_path):
    big = replace(DATA, train_size=50000)
    assert clf.cache_path(big, tmp_path, max_images=1000) != clf.cache_path(big, tmp_path, max_images=20000)
    # a cap above the training split changes nothing, so it names nothing
    assert clf.cache_path(DATA, tmp_path, max_images=4096) == clf.cache_path(DATA, tmp_path, max_images=20000)
    model = get_classifier(DATA, cache)
    done, planned = model.epochs
    assert done == planned >= 4  # the 16-pixel shapes classifier trains to its end
    cut = clf.train_classifier(replace(DATA, train_size=512), time_limit_s=0.0)
    assert cut.epochs[0] == 1 and cut.epochs[1] > 1  # stopped by the time limit, and it says so


@pytest.mark.parametrize("over,fragment", [
    ([("eval.samples", 3)], "3 samples are too few for prc (at least 4)"),
    ([("eval.samples", 1), ("eval.metrics", ["fid"])], "1 samples are too few for fid (at least 2)"),
    ([("eval.metrics", ["fid", "fid_floor"]), ("eval.reference_samples", 512)], "fid_floor is measured at"),
])
def test_evaluation_settings_that_cannot_be_computed_are_refused(over, fragment):
    from dimr_lab.spec.run_spec import load_run_spec

    with pytest.raises(SpecError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_run_spec(None, over)


def test_a_registered_metric_evaluate_does_not_compute_is_reported_skipped(tmp_path):
    """A metric registered without its computation in evaluate() came out as a silent null in metrics.json."""
    from dimr_lab.eval.metrics import Metric
    from dimr_lab.registry import METRICS

    METRICS.register("scratch_metric", "a metric with no computation")(Metric("scratch_metric"))
    try:
        weights = tmp_path / "w.pth"
        weights.write_bytes(b"x")  # never read: nothing here calls torch-fidelity
        spec = EvalSpec(samples=4, metrics=["scratch_metric"], classifier=False,
                        feature_extractor="inception-v3-compat", inception_weights=str(weights))
        images = torch.zeros(4, 3, 16, 16, dtype=torch.uint8)
        out = evaluate(images, torch.zeros(4), DataSpec(name="shapes", image_size=16), spec, cache_dir=tmp_path)
    finally:
        METRICS._entries.pop("scratch_metric", None)
    assert "scratch_metric" not in out and "does not compute it" in out["skipped"]["scratch_metric"]


def test_the_floor_takes_as_many_real_images_as_there_are_samples_when_the_reference_is_smaller(tmp_path):
    """digits' test split (359 images) is smaller than 400 samples, so the reference is capped at 359. The
    floor compared 359 train images with it: not what a perfect model's 400 samples score. Samples that are
    the floor's own real set must score exactly the floor."""
    pytest.importorskip("sklearn", reason="digits is an optional extra (scikit-learn)")
    digits = DataSpec(name="digits", image_size=16)
    train = build_dataset(digits, split="train")
    n = 400
    res = evaluate(train.images[:n], train.labels[:n], digits,
                   EvalSpec(samples=n, batch_size=200, kid_subset_size=50, metrics=["fid", "fid_floor"]),
                   cache_dir=tmp_path)
    assert res["num_real"] == 359 < n == res["num_samples"]
    assert res["fid_floor_samples"] == n
    assert res["fid_floor"] == pytest.approx(res["fid"], rel=1e-9)


def test_frequency_labels_are_refused_where_the_training_labels_are_unknown(monkeypatch):
    """class_counts returned None for a dataset without a label list, and the evaluation silently drew
    balanced labels while its record said 'frequency'."""
    from dimr_lab.eval import run as eval_run
    from dimr_lab.spec.run_spec import load_run_spec

    with pytest.raises(SpecError, match="eval.labels: 'frequency'"):
        load_run_spec(None, [("data.name", "latents"), ("data.num_classes", 2), ("data.image_size", 16),
                             ("model.in_channels", 4), ("eval.labels", "frequency"), ("eval.feature_extractor",
                                                                                      "inception-v3-compat"),
                             ("eval.metrics", ["fid"])])
    spec = load_run_spec(None, [("eval.labels", "frequency"), ("data.train_size", 64)])
    assert eval_run.class_counts(spec).tolist() == [8] * 8

    class Unlabelled:
        num_classes = 8

    monkeypatch.setattr("dimr_lab.data.build_dataset", lambda *a, **k: Unlabelled())
    with pytest.raises(SpecError, match="eval.labels: 'frequency'"):
        eval_run.class_counts(spec)


def _tree(path):
    """Every file under path but the folder lock's holder line."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
            and p.name != ".lock"}


@pytest.mark.parametrize("content", ["garbage", "other_state_dict"])
def test_unusable_inception_weights_are_one_line_before_anything_is_written(tmp_path, capsys, monkeypatch, content):
    """A corrupt eval.inception_weights file was read by torch-fidelity only after every sample was made:
    a traceback, and an evaluation folder with its chunks left behind. Training with it did not notice."""
    from conftest import cli

    monkeypatch.setenv("DIMR_LAB_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "inception.pth"
    if content == "garbage":
        weights.write_bytes(b"not a torch file")
    else:
        torch.save({"fc.weight": torch.zeros(3, 2)}, weights)
    small = ["--set", "train.steps=2", "--set", "sample.steps=2", "--set", "sample.grid_size=2", "--set",
             "data.train_size=64", "--set", "data.image_size=16", "--set", "model.image_size=16", "--set",
             "train.batch_size=8", "--set", "eval.samples=8", "--set", "eval.batch_size=8", "--no-progress"]
    inception = ["--set", 'eval.feature_extractor="inception-v3-compat"', "--set", 'eval.metrics=["fid"]',
                 "--set", f'eval.inception_weights="{weights}"']
    # training with evaluation on refuses before it starts
    code, out, err = cli(["train", "--out", tmp_path / "trained", *small, *inception], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "eval.inception_weights" in err, err
    assert "Traceback" not in err and not (tmp_path / "trained").exists()
    # evaluating a trained run refuses before it samples or writes
    code, _, err = cli(["train", "--out", tmp_path / "run", *small, "--set", "eval.enabled=false"], capsys)
    assert code == 0, err
    before = _tree(tmp_path / "run")
    code, out, err = cli(["eval", tmp_path / "run", "--set", "eval.enabled=true", *inception], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "eval.inception_weights" in err, err
    assert "Traceback" not in err
    assert _tree(tmp_path / "run") == before


def test_training_the_classifier_leaves_every_other_generator_alone(monkeypatch):
    """train_classifier seeded its fork of the CPU generator with torch.manual_seed, which also reseeds every
    CUDA device (fork_rng(devices=[]) does not put those back): an evaluation left the CUDA generators at seed
    0. Its own numbers come from the CPU generator alone, seeded as before."""
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    torch.manual_seed(7)
    before = torch.get_rng_state()
    seeded.clear()
    a = clf.train_classifier(replace(DATA, train_size=256), time_limit_s=0.0)
    assert seeded == [], "training the classifier reseeded the CUDA generators"
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(8)  # another global state: the same classifier
    b = clf.train_classifier(replace(DATA, train_size=256), time_limit_s=0.0)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_labels_outside_the_classifier_classes_are_refused(cache, real):
    images, labels = real
    for bad in (8, -1):  # 8 = the null label of an 8-class dataset: not a class the classifier knows
        y = labels[:20].clone()
        y[3] = bad
        with pytest.raises(UserError, match="labels must lie in 0..7"):
            evaluate(images[:20], y, DATA, fast_eval(metrics=["isc"]), cache_dir=cache)


def test_distortion_rate_counts_class_probabilities_strictly_below_the_threshold(cache, real):
    images, labels = real
    first = evaluate(images[:50], labels[:50], DATA, fast_eval(metrics=["isc"]), cache_dir=cache)
    p = first["class_prob"]
    thr = float(np.sort(p)[10])  # a threshold equal to one sample's probability: that sample is not below it
    res = evaluate(images[:50], labels[:50], DATA, fast_eval(metrics=["isc"], distortion_threshold=thr),
                   cache_dir=cache)
    assert res["distortion_rate"] == pytest.approx(float((p < thr).mean()))
    assert res["distortion_rate"] < float((p <= thr).mean())


def test_the_floor_set_is_the_test_splits_next_images_disjoint_from_the_reference():
    from dimr_lab.eval.metrics import real_images_uint8

    spec = DataSpec(name="shapes", image_size=16, train_size=64)
    n = 20
    ref = real_images_uint8(spec, n, part=0)
    floor = real_images_uint8(spec, n, part=1)
    test = build_dataset(replace(spec, train_size=2 * n, flip=False), split="test").images  # the k + n images
    assert torch.equal(ref, test[:n]) and torch.equal(floor, test[n:2 * n])
    assert not any(torch.equal(a, b) for a in floor for b in ref)  # no reference image in the floor's set


def test_kid_subset_is_capped_by_the_real_images_and_skipped_below_two(cache, real):
    images, labels = real
    res = evaluate(images[:60], labels[:60], DATA, fast_eval(metrics=["kid"]), cache_dir=cache,
                   real_images=images[100:130])
    assert res["num_real"] == 30 and res["kid_subset_size"] == 30 and np.isfinite(res["kid_mean"])
    one = evaluate(images[:1], labels[:1], DATA, fast_eval(metrics=["kid"]), cache_dir=cache, real_images=images[100:130])
    assert one["skipped"]["kid"] == "fewer than 2 images" and "kid_mean" not in one


def test_no_floor_is_measured_against_given_real_images(cache, real):
    images, labels = real
    res = evaluate(images[:30], labels[:30], DATA, fast_eval(metrics=["fid_floor"]), cache_dir=cache,
                   real_images=images[100:130])
    assert res["fid_floor"] is None and "fid_floor_samples" not in res


def test_a_metric_named_twice_is_evaluated_and_listed_once(cache, real):
    images, labels = real
    res = evaluate(images[:20], labels[:20], DATA, fast_eval(metrics=["isc", "isc"]), cache_dir=cache)
    assert res["metrics"] == ["isc"]
