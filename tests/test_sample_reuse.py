"""An evaluation that differs from a finished one only in how the samples are measured takes that one's
samples (per_sample.npz) instead of sampling again; other sampling settings, --resample or a damaged file
sample anew."""

from __future__ import annotations

import dataclasses
import json

from dimr_lab.eval.reuse import DECIDE_SAMPLES, DO_NOT_DECIDE_SAMPLES, same_samples
from dimr_lab.spec.run_spec import OUTSIDE_EVAL_IDENTITY, EvalSpec, SampleSpec
from dimr_lab.spec.schema import to_dict


def test_every_sample_and_eval_setting_is_classified_once():
    """A new sample.* or eval.* field must be put in DECIDE_SAMPLES or DO_NOT_DECIDE_SAMPLES: otherwise an
    evaluation could take samples drawn with another value of it."""
    for section, cls in (("sample", SampleSpec), ("eval", EvalSpec)):
        fields = {f.name for f in dataclasses.fields(cls)}
        decide, other = set(DECIDE_SAMPLES[section]), set(DO_NOT_DECIDE_SAMPLES[section])
        assert not decide & other, section
        assert decide | other == fields, (section, fields ^ (decide | other))
    assert set(DECIDE_SAMPLES) == set(DO_NOT_DECIDE_SAMPLES) == {"sample", "eval"}
    # what an evaluation's name leaves out cannot decide its samples (two would share a folder)
    for section, keys in OUTSIDE_EVAL_IDENTITY.items():
        assert set(keys) <= set(DO_NOT_DECIDE_SAMPLES[section])


def _other(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return [*value, "x"]


def test_same_samples_follows_the_classification():
    base = {k: to_dict(v) for k, v in (("sample", SampleSpec()), ("eval", EvalSpec()))}
    assert same_samples(base, json.loads(json.dumps(base)))  # as read back from eval.json
    for section in ("sample", "eval"):
        for key in (*DECIDE_SAMPLES[section], *DO_NOT_DECIDE_SAMPLES[section]):
            changed = json.loads(json.dumps(base))
            changed[section][key] = _other(changed[section][key])
            assert same_samples(base, changed) is (key in DO_NOT_DECIDE_SAMPLES[section]), f"{section}.{key}"
        for key in DECIDE_SAMPLES[section]:  # a record without the setting (an older one) is not trusted
            missing = json.loads(json.dumps(base))
            del missing[section][key]
            assert not same_samples(missing, base) and not same_samples(base, missing), f"{section}.{key}"
    assert not same_samples(base, {"sample": base["sample"]})

