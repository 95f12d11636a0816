"""`dimr-lab table`: choosing each run's evaluation, mean ± std over seeds, deltas, paper columns, paired step
statistics, every output format, plots, the CLI, and that the table layer never imports torch."""

from __future__ import annotations

import functools
import itertools
import io
import json
import math
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from conftest import cli, opens_and_modules
from dimr_lab.errors import UserError
from dimr_lab.rundir import RunDir, RunRecord, write_eval_record, write_json
from dimr_lab.spec.run_spec import load_run_spec
from dimr_lab.spec.schema import set_dotted, to_dict
from dimr_lab.table import (STEP_COLUMNS, aggregate, collect, collect_curves, format_table, paper_row, render_table,
                            step_statistics)
from dimr_lab.table.collect import Damaged

PNG = b"\x89PNG\r\n\x1a\n"
_FOLDERS = itertools.count()
T2 = "table2_ablation_imagenet64"  # rows 1..6: FID 5.85, 5.44, 7.91, 5.21, 4.86, 3.65


# ------------------------------------------------------------------------------------ synthetic trees

@functools.lru_cache(maxsize=None)
def _default_spec() -> str:
    return json.dumps(to_dict(load_run_spec(None)))


def make_spec(seed: int = 0, **dotted: Any) -> dict:
    """The built-in default run spec, resolved, with train.seed and dotted overrides ('sample__steps')."""
    spec = json.loads(_default_spec())
    spec["train"]["seed"] = seed
    for key, value in dotted.items():
        set_dotted(spec, key.replace("__", "."), value)
    return spec


def planned(spec: dict) -> tuple[str, dict]:
    """(eval hash, settings) of a spec's planned evaluation."""
    rs = load_run_spec(spec)
    return rs.eval_hash(), {"sample": to_dict(rs.sample), "eval": to_dict(rs.eval)}


def metrics_for(fid: float | None, seed: int = 0, **more: Any) -> dict:
    """A metrics.json whose numbers derive from fid and seed."""
    return {"fid": fid, "kid": fid / 100 if isinstance(fid, float) else None, "isc": 40.0 + seed, "precision": 0.6,
            "recall": 0.5, "sample_accuracy": 0.9, "fid_floor": 2.5, "params": 843_393, "gmacs": 0.0227,
            "train_images_per_s": 200.0 + seed, "git_commit": "deadbeef", "git_dirty": False, **more}


def add_eval(folder: Path, step: int, metrics: dict | None, spec: dict) -> Path:
    """One evaluation of the run at `step` with the settings of `spec`; metrics None leaves it unfinished."""
    ehash, settings = planned(spec)
    d = RunDir(folder).eval_dir(step, ehash)
    write_eval_record(d, step, ehash, settings, "")
    if metrics is not None:
        write_json(d / "metrics.json", {"step": step, "images_seen": step * 32, **metrics})
    return d


def write_run(root: Path, ablation: str, variant: str, seed: int, metrics: dict | None, *, step: int = 600,
              spec: dict | None = None, **fields: Any) -> Path:
    """A run folder as the runner writes it, with its planned evaluation at `step`."""
    spec = spec or make_spec(seed)
    folder = root / ablation / f"{variant}-s{seed}-{next(_FOLDERS):04d}"
    record = RunRecord(spec=spec, identity="abc", ablation=ablation, variant=variant, seed=seed,
                       title=fields.pop("title", f"{ablation} ablation"), profile=fields.pop("profile", "tiny"),
                       **fields)
    RunDir(folder).write_record(record)
    add_eval(folder, step, metrics, spec)
    return folder


def write_legacy(root: Path, variant: str, seed: int, fid: float, steps: int = 500) -> Path:
    """A folder of the older layout: run.json, spec.json and metrics.json side by side, no evals/."""
    folder = root / "old" / f"{variant}-s{seed}"
    spec = make_spec(seed)
    RunDir(folder).write_record(RunRecord(spec=spec, identity="old", ablation="old", variant=variant, seed=seed,
                                          version=1))
    RunDir(folder).write_spec_document(spec, "old")
    write_json(folder / "metrics.json", {**metrics_for(fid, seed), "steps": steps})
    return folder


# variant -> (variant_index, fids of seeds 0..2, paper reference); tdln is the declared base though not first
NORM = {
    "adaln": (0, [4.0, 4.2, 4.4], {"table": T2, "row": 3}),
    "tdln": (1, [3.6, 3.7, 3.8], {"table": T2, "row": 4}),
    "ln_token": (2, [5.0, 5.5, 6.0], None),
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """results/norm: three variants x three seeds, base tdln, two variants mapped to Table 2."""
    root = tmp_path / "results"
    for variant, (index, fids, paper) in NORM.items():
        for seed, fid in enumerate(fids):
            write_run(root, "norm", variant, seed, metrics_for(fid, seed), variant_index=index, paper=paper,
                      baseline="tdln", title="TD-LN vs adaLN", factors={"norm": variant.upper(), "branches": 3})
    return root


def row(table: pd.DataFrame, variant: str, ablation: str = "norm") -> pd.Series:
    hit = table[(table["ablation"] == ablation) & (table["variant"] == variant)]
    assert len(hit) == 1, hit
    return hit.iloc[0]


def md_rows(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header, {first cell: cells}) of the first markdown pipe table in text."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    return split(lines[0]), {split(r)[0]: split(r) for r in lines[2:]}


# ------------------------------------------------------------------------------------ aggregation

def test_mean_std_and_seed_counts(tree):
    runs, warnings = collect(tree)
    assert warnings == [] and len(runs) == 9
    assert set(runs["step"]) == {600} and set(runs["eval_label"]) == {""} and set(runs["data_key"]) == {"shapes:16:16"}
    table = aggregate(runs)
    assert list(table["variant"]) == ["adaln", "tdln", "ln_token"]  # variant_index order, not names
    for variant, (_, fids, _) in NORM.items():
        r = row(table, variant)
        assert r["n_seeds"] == 3 and r["seeds"] == "0,1,2" and r["fid_n"] == 3
        assert r["fid_mean"] == pytest.approx(statistics.mean(fids))
        assert r["fid_std"] == pytest.approx(statistics.stdev(fids))
        assert r["isc_mean"] == pytest.approx(41.0) and r["isc_std"] == pytest.approx(1.0)
        assert r["params_m_mean"] == pytest.approx(0.843393) and r["fid_floor_mean"] == 2.5


def test_deltas_against_declared_base_else_first_variant(tree, tmp_path):
    table = aggregate(collect(tree)[0])
    assert list(table["base"]) == [False, True, False]
    base_fid = statistics.mean(NORM["tdln"][1])
    assert row(table, "tdln")["fid_delta"] == 0.0
    assert row(table, "adaln")["fid_delta"] == pytest.approx(4.2 - base_fid)
    assert row(table, "ln_token")["kid_delta"] == pytest.approx((5.5 - base_fid) / 100)
    for index, (variant, fid) in enumerate((("zeta", 2.0), ("alpha", 3.0))):  # no baseline: the first by index
        write_run(tmp_path / "r2", "abl", variant, 0, metrics_for(fid), variant_index=index)
    table = aggregate(collect(tmp_path / "r2")[0])
    assert list(table["variant"]) == ["zeta", "alpha"] and list(table["base"]) == [True, False]
    assert list(table["fid_delta"]) == pytest.approx([0.0, 1.0])
    assert math.isnan(row(table, "zeta", "abl")["fid_std"])  # one seed: no spread


def test_deltas_across_other_steps_or_settings_are_kept_but_warned(tmp_path):
    # b was evaluated on 256 samples where the base a used 1024, and c is still behind at step 300: the overall
    # table's deltas compare them all the same (as --step/--eval may ask), but says so; --steps pairs none
    for seed in range(2):
        write_run(tmp_path, "abl", "a", seed, metrics_for(50.0 + seed, seed), variant_index=0,
                  spec=make_spec(seed, eval__samples=1024))
        write_run(tmp_path, "abl", "b", seed, metrics_for(40.0 + seed, seed), variant_index=1,
                  spec=make_spec(seed, eval__samples=256))
        write_run(tmp_path, "abl", "c", seed, metrics_for(45.0 + seed, seed), variant_index=2,
                  spec=make_spec(seed, eval__samples=1024), step=300 if seed == 1 else 600)
    said: list[str] = []
    table = aggregate(collect(tmp_path)[0], on_warning=said.append)
    assert row(table, "b", "abl")["fid_delta"] == pytest.approx(-10.0)
    assert [w for w in said if "abl/b" in w] == [
        "abl/b (tiny): its deltas compare evaluations with other settings than the base a's "
        "(eval.samples 256 vs 1024)"]
    assert [w for w in said if "abl/c" in w] == [
        "abl/c (tiny): its deltas compare step 300-600 with the base a's step 600 (a run still training, or "
        "evaluated at other steps)"]
    said.clear()
    for seed in range(2):  # the same step and settings: nothing to say
        for index, variant in enumerate("ab"):
            write_run(tmp_path / "equal", "abl", variant, seed, metrics_for(50.0 - index, seed), variant_index=index)
    aggregate(collect(tmp_path / "equal")[0], on_warning=said.append)
    assert said == []


def test_evaluations_measured_by_different_classifiers_are_said(tmp_path):
    # seed 1 of b was evaluated where the shapes classifier had been trained again (another machine): its
    # classifier FID comes from another instrument; evaluations without a recorded digest count for nothing
    for seed in range(2):
        write_run(tmp_path, "abl", "a", seed, metrics_for(50.0 + seed, seed, classifier_digest="aaaaaaaaaaaa"),
                  variant_index=0)
        write_run(tmp_path, "abl", "b", seed, metrics_for(40.0 + seed, seed, classifier_digest="bbbbbbbbbbbb"
                                                          if seed else "aaaaaaaaaaaa"), variant_index=1)
        write_run(tmp_path, "old", "a", seed, metrics_for(50.0 + seed, seed), variant_index=0)
        write_run(tmp_path, "old", "b", seed, metrics_for(40.0, seed, classifier_digest="aaaaaaaaaaaa"),
                  variant_index=1)
    runs, warnings = collect(tmp_path)
    said = [w for w in warnings if "dataset classifiers" in w]
    assert len(said) == 1 and said[0].startswith("abl (tiny): its evaluations were measured by 2 different "
                                                 "dataset classifiers (classifier_digest aaaaaaaaaaaa, bbbbbbbbbbbb)")
    assert "_classifier" not in runs.columns and len(runs) == 8


@pytest.mark.parametrize("key,what", [("extractor_digest", "Inception weights files"),
                                      ("reference_digest", "reference statistics files")])
def test_evaluations_against_different_weights_or_reference_files_are_said(tmp_path, key, what):
    # the evaluation's name holds eval.inception_weights' and eval.reference_stats' paths, not their content:
    # a file replaced at the same path leaves the same name, and only the recorded digest tells them apart
    for seed in range(2):
        write_run(tmp_path, "abl", "a", seed, metrics_for(50.0 + seed, seed, **{key: "111111111111"}), variant_index=0)
        write_run(tmp_path, "abl", "b", seed, metrics_for(40.0 + seed, seed, **{key: "222222222222" if seed else
                                                                               "111111111111"}), variant_index=1)
    runs, warnings = collect(tmp_path)
    said = [w for w in warnings if what in w]
    assert len(said) == 1 and f"measured by 2 different {what} ({key} 111111111111, 222222222222)" in said[0]
    assert not [c for c in runs.columns if c.startswith("_")] and len(runs) == 4
    same = tmp_path / "same"
    for seed in range(2):
        write_run(same, "abl", "a", seed, metrics_for(50.0, seed, **{key: "111111111111"}), variant_index=0)
    assert not [w for w in collect(same)[1] if what in w]


def test_paper_columns(tree):
    table = aggregate(collect(tree)[0])
    assert (row(table, "tdln")["paper_fid"], row(table, "tdln")["paper_params_m"]) == (5.21, 154.0)
    assert row(table, "adaln")["paper_ref"] == f"{T2} row 3" and math.isnan(row(table, "ln_token")["paper_fid"])
    big = paper_row({"table": "imagenet256", "model": "DiMR-XL/2R", "epochs": 800})
    assert (big["paper_fid"], big["paper_is"], big["paper_gflops"]) == (1.70, 289.0, 160)
    distortion = paper_row({"table": "distortion_rate", "model": "DiMR-XL/2R", "epochs": 400})
    assert distortion["paper_distortion_rate"] == 0.292
    for bad in ({"table": "imagenet256", "model": "DiMR-XL/2R"}, {"table": T2, "row": 9},
                {"table": "../../etc/passwd", "row": 1}, {"row": 1}, "table2"):
        with pytest.raises(UserError):
            paper_row(bad)
    header, cells = md_rows(render_table(tree, "markdown"))
    paper = header.index("Paper FID")
    assert cells["tdln (base)"][paper] == "5.21" and cells["ln_token"][paper] == ""


@pytest.mark.parametrize("ref", [{"table": T2, "row": [1]}, {"table": T2, "row": True},
                                 {"table": "imagenet256", "model": "DiMR-XL/2R", "epochs": [400]},
                                 {"table": "imagenet256", "model": ["DiMR-XL/2R"], "epochs": 400}])
def test_a_malformed_paper_reference_is_one_warning_not_a_crash(tmp_path, ref):
    write_run(tmp_path, "abl", "a", 0, metrics_for(5.0), paper=ref)
    with pytest.raises(UserError, match="paper reference: '(row|model|epochs)' must be"):
        paper_row(ref)
    runs, warnings = collect(tmp_path)
    assert len(runs) == 1 and math.isnan(runs["paper_fid"].iloc[0])
    assert len(warnings) == 1 and "paper reference" in warnings[0]


def test_paper_rows_follow_the_evaluated_step(tmp_path):
    """epochs_at maps an earlier training step to its own published row (the 400-epoch numbers of a run
    trained to 800 epochs); every other step shows the final row."""
    ref = {"table": "imagenet256", "model": "DiMR-XL/2R", "epochs": 800, "epochs_at": {"500000": 400}}
    folder = write_run(tmp_path, "main", "xl", 0, metrics_for(3.0), step=1_000_000, paper=ref)
    add_eval(folder, 500_000, metrics_for(4.0), make_spec(0))
    add_eval(folder, 200_000, metrics_for(9.0), make_spec(0))
    curves, warnings = collect_curves(tmp_path)
    assert warnings == []
    by_step = {int(r["step"]): (r["paper_fid"], r["paper_ref"]) for _, r in curves.iterrows()}
    assert by_step[500_000] == (1.77, "imagenet256 DiMR-XL/2R (400 ep)")
    assert by_step[1_000_000] == (1.70, "imagenet256 DiMR-XL/2R (800 ep)")
    assert by_step[200_000] == (1.70, "imagenet256 DiMR-XL/2R (800 ep)")
    assert row(aggregate(collect(tmp_path, step=500_000)[0]), "xl", "main")["paper_fid"] == 1.77


def test_grid_points_are_compared_at_the_same_point(tmp_path):
    for variant, offset in (("base", 0.0), ("other", 1.0)):
        for lr, fid in ((1e-3, 3.0), (3e-4, 4.0)):
            write_run(tmp_path, "g", variant, 0, metrics_for(fid + offset), grid={"train.lr": lr}, baseline="base",
                      variant_index=int(variant == "other"), spec=make_spec(0, train__lr=lr))
    runs = collect(tmp_path)[0]
    table = aggregate(runs)
    assert list(table["grid.train.lr"]) == [3e-4, 1e-3, 3e-4, 1e-3]
    assert list(table["fid_delta"]) == pytest.approx([0.0, 0.0, 1.0, 1.0])  # never across grid points
    stats = step_statistics(runs)
    assert len(stats) == 2 and set(stats["grid"]) == {'{"train.lr": 0.001}', '{"train.lr": 0.0003}'}


def test_each_profile_is_its_own_block_of_rows_with_its_own_base(tmp_path):
    for profile, scale in (("tiny", 10.0), ("small", 1.0)):
        for index, variant in enumerate(("base", "other")):
            write_run(tmp_path, "p", variant, 0, metrics_for(scale * (1 + index)), profile=profile, baseline="base",
                      variant_index=index)
    table = aggregate(collect(tmp_path)[0])
    assert list(zip(table["profile"], table["variant"])) == [("small", "base"), ("small", "other"),
                                                             ("tiny", "base"), ("tiny", "other")]
    assert list(table["fid_delta"]) == pytest.approx([0.0, 1.0, 0.0, 10.0])


def test_missing_and_non_numeric_metric_is_nan_with_warning_and_seed_count(tmp_path):
    for seed, fid in enumerate([60.0, "n/a", 62.4]):
        write_run(tmp_path, "abl", "v", seed, metrics_for(fid, seed))
    runs, warnings = collect(tmp_path)
    assert len(warnings) == 1 and "fid='n/a' is not a number" in warnings[0] and "v-s1" in warnings[0]
    assert math.isnan(runs.loc[runs["seed"] == 1, "fid"].iloc[0])
    seen: list[str] = []
    table = aggregate(runs, on_warning=seen.append)
    r = table.iloc[0]
    assert r["n_seeds"] == 3 and r["fid_n"] == 2 and r["fid_mean"] == pytest.approx(61.2)
    assert len(seen) == 2 and all("missing: seed 1" in w for w in seen)  # fid and kid
    assert "61.2 ± 1.7 (n=2/3)" in format_table(table, "markdown")
    lines: list[str] = []
    render_table(tmp_path, "markdown", on_warning=lines.append)
    assert any("fid has values for 2 of 3 seeds" in w for w in lines)


def test_odd_json_values_never_crash(tmp_path):
    odd = {"fid": True, "kid": [1, 2], "isc": {"a": 1}, "precision": 10**400, "recall": "0.5",
           "sample_accuracy": None, "params": -1, "git_commit": 7, "git_dirty": "yes"}
    write_run(tmp_path, "abl", "odd", 0, {**metrics_for(3.0), **odd}, variant_index=10**400,
              factors={"nested": {"a": [1, 2]}, "huge": 10**30, "none": None}, grid={"x": [1, 2]})
    write_run(tmp_path, "abl", "fine", 0, metrics_for(3.0, 0))
    bad_record = write_run(tmp_path, "abl", "typed", 1, metrics_for(3.0, 1))
    (bad_record / "run.json").write_text(json.dumps({"spec": {}, "identity": "x", "seed": "one"}))
    bad_spec = write_run(tmp_path, "abl", "badspec", 0, metrics_for(3.0), spec=make_spec(0))
    record = json.loads((bad_spec / "run.json").read_text())
    record["spec"]["train"]["lr"] = "fast"
    (bad_spec / "run.json").write_text(json.dumps(record))
    broken = write_run(tmp_path, "abl", "broken", 0, None)
    next((broken / "evals").iterdir()).joinpath("metrics.json").write_text('{"fid": NaN}')
    alone = tmp_path / "abl" / "trained-by-hand"  # only the trainer's spec.json
    RunDir(alone).write_spec_document(make_spec(5), "z")
    add_eval(alone, 600, metrics_for(9.0), make_spec(5))
    runs, warnings = collect(tmp_path)
    assert sorted(runs["variant"]) == ["fine", "odd", "trained-by-hand"]
    odd_row = runs[runs["variant"] == "odd"].iloc[0]
    for col in ("fid", "kid", "isc", "precision", "recall", "sample_accuracy"):
        assert math.isnan(odd_row[col]), col
    assert odd_row["factor.huge"] == str(10**30) and odd_row["factor.nested"] == '{"a": [1, 2]}'
    text = "\n".join(warnings)
    for what in ("fid=True", "kid=[1, 2]", "precision=", "recall='0.5'", "variant_index", str(bad_record),
                 str(bad_spec), "not valid JSON"):
        assert what in text, what
    with pytest.raises(UserError, match="--skip-damaged") as err:  # damaged files stop the table: one line
        render_table(tmp_path, "rich", on_warning=lambda line: None)
    assert "\n" not in str(err.value)
    for fmt in ("rich", "markdown", "latex", "csv"):
        assert render_table(tmp_path, fmt, on_warning=lambda line: None, skip_damaged=True)
    assert isinstance(step_statistics(runs), pd.DataFrame)  # odd and fine sit at different grid points


def test_a_damaged_latest_evaluation_is_not_replaced_by_an_earlier_step(tmp_path):
    """The final table compares the runs' last evaluations: a run whose last one does not read is left out
    (and named), never shown at an earlier step among the others' later ones."""
    for seed in range(3):
        folder = write_run(tmp_path, "abl", "v", seed, metrics_for(50.0 + seed, seed), step=600)
        add_eval(folder, 1200, metrics_for(30.0 + seed, seed), make_spec(seed))
    latest = sorted((folder / "evals").iterdir())[-1]
    (latest / "metrics.json").write_text('{"fid": 3')
    runs, warnings = collect(tmp_path)
    assert list(runs["step"]) == [1200, 1200] and list(runs["fid"]) == [30.0, 31.0]
    assert any(isinstance(w, Damaged) and str(folder) in w and "not replaced by step 600" in w for w in warnings)
    with pytest.raises(UserError, match="not valid JSON"):
        render_table(tmp_path, "csv", on_warning=lambda line: None)
    assert "v" in render_table(tmp_path, "csv", on_warning=lambda line: None, skip_damaged=True)


@pytest.mark.parametrize("record", ['{"step": 12', '{"step": "1200"}'])
def test_a_damaged_evaluation_record_is_damage_not_an_unfinished_or_earlier_evaluation(tmp_path, record):
    """An eval.json that does not read beside a finished metrics.json stops the table like a damaged
    metrics.json; with --skip-damaged the run is left out, not shown at its earlier step."""
    for seed in range(3):
        folder = write_run(tmp_path, "abl", "v", seed, metrics_for(50.0 + seed, seed), step=600)
        add_eval(folder, 1200, metrics_for(30.0 + seed, seed), make_spec(seed))
    latest = sorted((folder / "evals").iterdir())[-1]
    (latest / "eval.json").write_text(record)
    runs, warnings = collect(tmp_path)
    assert list(runs["step"]) == [1200, 1200]
    assert any(isinstance(w, Damaged) and str(latest / "eval.json") in w for w in warnings)
    assert any(isinstance(w, Damaged) and "not replaced by step 600" in w for w in warnings)
    with pytest.raises(UserError, match="--skip-damaged"):
        render_table(tmp_path, "csv", on_warning=lambda line: None)


def test_eval_filters_name_known_settings_and_an_empty_table_says_why_in_one_line(tmp_path):
    for seed in range(2):
        write_run(tmp_path, "abl", "v", seed, metrics_for(50.0 + seed, seed), step=600)
    with pytest.raises(UserError, match="unknown --eval sample.* key 'guidance'.*guidance_scale"):
        render_table(tmp_path, eval_filter=["sample.guidance=1"])
    with pytest.raises(UserError) as err:
        render_table(tmp_path, step=1234, on_warning=lambda line: pytest.fail(line))
    assert "no finished runs" in str(err.value) and "no finished evaluation at step 1234 (finished: 600)" in str(err.value)
    assert "and 1 more warning)" in str(err.value) and "\n" not in str(err.value)


def test_unfinished_runs_warn(tree):
    folder = write_run(tree, "norm", "tdln", 7, None)
    runs, warnings = collect(tree)
    assert len(runs) == 9 and len(warnings) == 1
    assert str(folder) in warnings[0] and "unfinished" in warnings[0]


def test_legacy_folders_read_as_one_final_evaluation(tmp_path):
    for seed, fid in enumerate([5.0, 7.0]):
        write_legacy(tmp_path, "v", seed, fid)
    runs, warnings = collect(tmp_path)
    assert warnings == [] and list(runs["step"]) == [500, 500] and set(runs["eval_label"]) == {""}
    assert list(runs["images_seen"]) == [500 * 32] * 2  # from the spec's batch when metrics lack it
    assert aggregate(runs)["fid_mean"].iloc[0] == pytest.approx(6.0)


# ------------------------------------------------------------------------------------ choosing evaluations

def test_step_selection(tmp_path):
    for seed in range(2):
        folder = write_run(tmp_path, "abl", "v", seed, metrics_for(50.0 + seed, seed), step=600)
        add_eval(folder, 1200, metrics_for(30.0 + seed, seed), make_spec(seed))
        add_eval(folder, 1800, None, make_spec(seed))  # still running: not the latest finished
    runs, warnings = collect(tmp_path)
    assert set(runs["step"]) == {1200} and list(runs["fid"]) == [30.0, 31.0] and warnings == []
    runs, _ = collect(tmp_path, step=600)
    assert list(runs["fid"]) == [50.0, 51.0]
    runs, warnings = collect(tmp_path, step=900)
    assert runs.empty and len(warnings) == 2
    assert "no finished evaluation at step 900 (finished: 600, 1200)" in warnings[0]
    assert "step 600" in render_table(tmp_path, "rich", step=600)
    curves, _ = collect_curves(tmp_path)
    assert sorted(zip(curves["seed"], curves["step"])) == [(0, 600), (0, 1200), (1, 600), (1, 1200)]


def test_eval_settings_selection(tmp_path):
    guided = make_spec(0, sample__guidance_scale=1.5)
    plain = write_run(tmp_path, "abl", "v", 0, metrics_for(50.0))
    add_eval(plain, 600, metrics_for(40.0), guided)  # another setting at the same step: the plan wins
    other = write_run(tmp_path, "abl", "v", 1, None)  # planned evaluation unfinished, the guided one done
    add_eval(other, 600, metrics_for(41.0, 1), make_spec(1, sample__guidance_scale=1.5))
    runs, warnings = collect(tmp_path)
    assert list(runs["fid"]) == [50.0, 41.0] and list(runs["eval_label"]) == ["", "sample.guidance_scale=1.5"]
    assert len(warnings) == 1 and str(other) in warnings[0] and "using sample.guidance_scale=1.5" in warnings[0]
    text = render_table(tmp_path, "rich", on_warning=lambda line: None)
    assert "sample.guidance_scale=1.5" in " ".join(text.splitlines()[:2])  # the title line says so
    runs, warnings = collect(tmp_path, eval_filter=[("sample.guidance_scale", "1.5")])
    assert list(runs["fid"]) == [40.0, 41.0] and warnings == []
    runs, warnings = collect(tmp_path, eval_filter=["sample.guidance_scale=2"])
    assert runs.empty and "no finished evaluation with sample.guidance_scale=2" in warnings[0]
    with pytest.raises(UserError, match="sample.\\* or eval.\\*"):
        collect(tmp_path, eval_filter=["train.lr=1"])


def test_superseded_folder_of_the_same_seed_is_dropped(tmp_path):
    old = write_run(tmp_path, "abl", "v", 0, metrics_for(9.0), spec=make_spec(0, train__lr=1e-3))
    new = write_run(tmp_path, "abl", "v", 0, metrics_for(3.0), spec=make_spec(0, train__lr=2e-3))
    for p in (old / "evals").rglob("*"):
        os.utime(p, (1_000_000, 1_000_000))
    runs, warnings = collect(tmp_path)
    assert list(runs["folder"]) == [str(new)]
    assert len(warnings) == 1 and str(old) in warnings[0] and "superseded" in warnings[0]


def test_a_table_of_two_plans_says_so(tmp_path):
    """`run --set train.ema_warmup=true` again: glu's newer runs finished first and superseded its older ones,
    and the table compared them with mlp's older runs (warm-up off) as one plan, saying only 'superseded'."""
    def age(folder):
        for p in (folder / "evals").rglob("*"):
            os.utime(p, (1_000_000, 1_000_000))

    for seed in (0, 1):
        for variant, i, mlp in (("glu", 0, "glu"), ("mlp", 1, "mlp")):
            age(write_run(tmp_path, "abl", variant, seed, metrics_for(100.0 + i, seed), variant_index=i,
                          spec=make_spec(seed, model__mlp=mlp)))
        write_run(tmp_path, "abl", "glu", seed, metrics_for(60.0, seed), variant_index=0,
                  spec=make_spec(seed, train__ema_warmup=True))
    runs, warnings = collect(tmp_path)
    mixed = [w for w in warnings if "two plans" in w]
    assert len(mixed) == 1, warnings
    assert mixed[0].startswith("abl (tiny): glu's newer runs changed train.ema_warmup from false to true, and the "
                               "runs of mlp compared beside them still have false")
    for seed in (0, 1):  # mlp's newer runs too: one plan again
        write_run(tmp_path, "abl", "mlp", seed, metrics_for(70.0, seed), variant_index=1,
                  spec=make_spec(seed, model__mlp="mlp", train__ema_warmup=True))
    runs, warnings = collect(tmp_path)
    assert not [w for w in warnings if "two plans" in w] and len(runs) == 4
    # a change that belongs to one variant (its own key, another value than the others have) is not two plans
    age(write_run(tmp_path / "own", "abl", "glu", 0, metrics_for(50.0, 0), variant_index=0, spec=make_spec(0)))
    age(write_run(tmp_path / "own", "abl", "mlp", 0, metrics_for(50.0, 0), variant_index=1,
                  spec=make_spec(0, model__mlp="mlp", model__branches__0__mlp_width=384)))  # 4d, as resolved
    write_run(tmp_path / "own", "abl", "mlp", 0, metrics_for(40.0, 0), variant_index=1,
              spec=make_spec(0, model__mlp="mlp", model__branches__0__mlp_width=288))
    runs, warnings = collect(tmp_path / "own")
    assert len(runs) == 2 and not [w for w in warnings if "two plans" in w], warnings


# ------------------------------------------------------------------------------------ formats

@pytest.fixture
def components(tmp_path: Path) -> Path:
    """Six variants with five boolean factors and long-ish names, as Table 2 of the paper."""
    names = ["uvit", "adaln_zero", "multi_branch", "tdln", "glu", "dimr"]
    keys = ["adaln_zero", "tdln", "multi_branch", "glu", "multi_scale_loss"]
    for i, name in enumerate(names):
        for seed in range(3):
            write_run(tmp_path, "table2_components", name, seed, metrics_for(114.41 - 9.7 * i + 7.3 * seed, seed),
                      variant_index=i, baseline="uvit", paper={"table": T2, "row": i + 1},
                      title="Table 2: U-ViT-M/4 to DiMR-M/3R, one component at a time",
                      factors={k: j < i for j, k in enumerate(keys)})
    return tmp_path


def test_rich_fits_120_columns(components):
    text = render_table(components, "rich")
    assert max(len(line) for line in text.splitlines()) <= 120
    for word in ("uvit (base)", "scale_", "Seeds", "Params", "GMACs", "FID", "ΔFID", "Sample acc.", "Paper",
                 "121.7 ± 7.3", "5.85"):
        assert word in text, word
    wide = render_table(components, "rich", wide=True)
    assert "Precision" in wide and "ΔIS" in wide and "Paper params (M)" in wide


def test_markdown(tree):
    header, cells = md_rows(render_table(tree, "markdown"))
    assert header[:3] == ["Variant", "norm", "Seeds"]  # 'branches' is the same in every row: left out
    assert set(cells) == {"adaln", "tdln (base)", "ln_token"}
    assert cells["tdln (base)"][header.index("FID")] == "3.70 ± 0.10"
    assert cells["adaln"][header.index("ΔFID")] == "+0.50" and cells["tdln (base)"][header.index("ΔFID")] == "base"
    text = render_table(tree, "markdown", metrics="fid,kid,isc", columns="+imgs,floor,step")
    header, cells = md_rows(text)
    for h in ("KID", "IS", "img/s", "FID floor", "Step"):
        assert h in header, h
    assert "Sample acc." not in header and cells["adaln"][header.index("Step")] == "600"
    header, _ = md_rows(render_table(tree, "markdown", columns="seeds"))
    assert header == ["Variant", "Seeds", "FID", "Sample acc."]
    with pytest.raises(UserError, match="^--metrics: unknown metric column 'fidd'"):  # the option it came from
        render_table(tree, "markdown", metrics="fidd")
    with pytest.raises(UserError, match="^--columns: unknown table column 'colour'"):
        render_table(tree, "markdown", columns="colour")
    with pytest.raises(UserError, match="^--format: unknown table format 'xls'; known: csv, latex, markdown, rich"):
        render_table(tree, "xls")


def test_latex_booktabs_with_escapes(tree, tmp_path):
    write_run(tree, "branch", "conv_1", 0, metrics_for(8.0), title="Branch_type & 100% $")
    text = render_table(tree, "latex")
    assert text.count(r"\toprule") == 2 and text.count(r"\midrule") == 2 and text.count(r"\bottomrule") == 2
    assert r"3.70 $\pm$ 0.10" in text and r"$\Delta$FID" in text and r"ln\_token" in text and r"conv\_1" in text
    assert "% Branch_type & 100% $ (branch)" in text  # titles are comments: nothing to escape
    norm = text[text.index("(norm)"):]
    body = norm[norm.index(r"\midrule"):norm.index(r"\bottomrule")].strip().splitlines()[1:]
    assert len(body) == 3 and all(line.endswith(r"\\") for line in body)


def test_csv_round_trips(tree):
    table = aggregate(collect(tree)[0])
    back = pd.read_csv(io.StringIO(render_table(tree, "csv")))
    assert list(back.columns) == list(table.columns) and len(back) == 3
    tdln = back.set_index("variant").loc["tdln"]
    assert tdln["fid_mean"] == pytest.approx(3.7) and tdln["fid_std"] == pytest.approx(0.1)
    assert tdln["paper_fid"] == 5.21


def test_integer_factors_print_as_integers(tmp_path):
    for variant, branches in (("one", 1), ("two", 2), ("free", None)):
        write_run(tmp_path, "b", variant, 0, metrics_for(3.0), factors={"branches": branches} if branches else {},
                  grid={"steps": 600}, baseline="one")
    for fmt in ("rich", "markdown", "latex", "csv"):
        text = render_table(tmp_path, fmt)
        assert "1.0" not in text and "2.0" not in text and "600.0" not in text, fmt
    header, cells = md_rows(render_table(tmp_path, "markdown"))
    assert cells["one (base)"][header.index("branches")] == "1" and cells["free"][header.index("branches")] == ""


def test_plot_and_curves_are_pngs(tree, tmp_path):
    for seed in range(3):  # a second step for real curves
        for variant in ("adaln", "tdln"):
            folder = next((tree / "norm").glob(f"{variant}-s{seed}-*"))
            add_eval(folder, 300, metrics_for(9.0 + seed, seed), make_spec(seed))
    bars, curves = tmp_path / "fid.png", tmp_path / "curves.png"
    render_table(tree, "csv", plot=bars, curves=curves)
    for png in (bars, curves):
        data = png.read_bytes()
        assert data[:8] == PNG and len(data) > 1000
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="cannot write"):
        render_table(tree, "csv", plot=tmp_path / "a-file" / "fid.png")  # its parent is a file


# ------------------------------------------------------------------------------------ statistics

def paired_tree(root: Path, diffs: list[float], paper_rows: tuple[int, int], *, image_sizes=(16, 16)) -> Path:
    """Variants a -> b over len(diffs) seeds: a_s = 50 + 3 s (a large seed spread), b_s = a_s + diffs[s]."""
    for seed, d in enumerate(diffs):
        for index, (variant, fid) in enumerate((("a", 50.0 + 3 * seed), ("b", 50.0 + 3 * seed + d))):
            size = image_sizes[index]
            spec = make_spec(seed, model__image_size=size, data__image_size=size)
            write_run(root, "abl", variant, seed, metrics_for(fid, seed), spec=spec, variant_index=index,
                      paper={"table": T2, "row": paper_rows[index]})
    return root


NOISE = [0.1, -0.15, 0.05, 0.2, -0.1, 0.0]


@pytest.mark.parametrize("diffs, rows, expected", [
    ([5 + e for e in NOISE], (1, 3), "agrees"),        # paper 5.85 -> 7.91: up, as ours
    ([5 + e for e in NOISE], (3, 4), "disagrees"),     # paper 7.91 -> 5.21: down
    ([0.3, -0.2, 0.1, -0.4, 0.25, -0.05], (1, 3), "inconclusive"),
])
def test_step_verdicts(tmp_path, diffs, rows, expected):
    runs = collect(paired_tree(tmp_path, diffs, rows))[0]
    s = step_statistics(runs).iloc[0]
    assert s["step"] == "a → b" and s["n"] == 6 and s["verdict"] == expected
    assert s["diff"] == pytest.approx(statistics.mean(diffs))
    assert s["from_mean"] == pytest.approx(57.5) and s["fid_floor"] == 2.5
    assert s["p_perm"] >= 2 / 2**6 and s["t_lo"] <= s["diff"] <= s["t_hi"]
    perm = step_statistics(runs, test="perm").iloc[0]
    assert perm["p_holm"] == pytest.approx(perm["p_perm"])  # one step: Holm changes nothing


def test_steps_against_the_baseline_without_published_numbers(tree):
    runs = collect(tree)[0]
    runs = runs.drop(columns=[c for c in runs.columns if c.startswith("paper_")])
    stats = step_statistics(runs)
    assert list(stats["step"]) == ["tdln → adaln", "tdln → ln_token"]
    assert set(stats["verdict"]) == {"no published sign"}
    text = render_table(tree, "rich", steps=True)
    assert "adaln → tdln" in text and "Holm" in text and "paired by seed" in text.lower()
    assert "cannot be below 2/2^3 = 0.25" in " ".join(text.split())


def test_a_variant_without_a_published_number_is_compared_with_the_baseline(tree):
    stats = step_statistics(collect(tree)[0])
    got = dict(zip(stats["step"], stats["verdict"]))
    assert set(got) == {"adaln → tdln", "tdln → ln_token"}, got  # published step + the unpublished variant
    assert got["tdln → ln_token"] == "no published sign"
    # Holm runs over both comparisons read together
    raw = sorted(stats["p_t"])
    assert stats["p_holm"].min() == pytest.approx(min(1.0, 2 * raw[0]))


def test_rows_on_different_data_are_not_compared(tmp_path):
    runs = collect(paired_tree(tmp_path, [5.0, 5.1, 4.9], (1, 3), image_sizes=(16, 32)))[0]
    assert set(runs["data_key"]) == {"shapes:16:16", "shapes:32:32"}
    s = step_statistics(runs).iloc[0]
    assert s["verdict"] == "not compared" and s["n"] == 0 and "different data" in s["note"]
    table = aggregate(runs)
    assert row(table, "b", "abl")["fid_delta"] != row(table, "b", "abl")["fid_delta"]  # NaN: no delta across data
    assert "different data" in render_table(tmp_path, "markdown", steps=True)


def test_a_seed_on_one_side_only_is_named_in_the_steps_note(tmp_path):
    for seed in range(4):
        write_run(tmp_path, "abl", "a", seed, metrics_for(50.0 + seed, seed), variant_index=0)
        if seed != 3:
            write_run(tmp_path, "abl", "b", seed, metrics_for(40.0 + seed, seed), variant_index=1)
    s = step_statistics(collect(tmp_path)[0]).iloc[0]
    assert s["n"] == 3 and s["from_mean"] == pytest.approx(51.0) and "seed 3 of a without a partner" in s["note"]
    assert "seed 3 of a without a partner" in render_table(tmp_path, "markdown", steps=True)


def test_steps_name_seeds_whose_two_sides_ran_on_different_machines(tmp_path, capsys):
    """metrics.json records the machine of each evaluation; the runs frame shows it (csv) and a step whose seed
    ran its two sides on two machines says which seeds and machines: floating point differs between machines,
    so that part of the difference is not the change. One side unrecorded (an older run) says nothing."""
    xeon, epyc = ({"cpu": name, "cpus": 2, "accelerator": None} for name in ("Xeon", "EPYC"))
    h200 = {"cpu": "EPYC", "cpus": 16, "accelerator": "NVIDIA H200"}
    for seed in range(4):
        write_run(tmp_path, "abl", "a", seed, metrics_for(50.0 + seed, seed, machine=xeon), variant_index=0)
        other = {0: xeon, 1: epyc, 2: h200}.get(seed)  # seed 3's b from before machines were recorded
        write_run(tmp_path, "abl", "b", seed, metrics_for(40.0 + seed, seed, **({"machine": other} if other else {})),
                  variant_index=1)
    runs = collect(tmp_path)[0]
    assert sorted(runs["machine"].fillna("-")) == ["-", "EPYC x2", "NVIDIA H200", *["Xeon x2"] * 5]
    s = step_statistics(runs).iloc[0]
    assert s["n"] == 4  # still paired: a note, not a refusal
    assert "seeds 1, 2 evaluated on different machines on the two sides (EPYC x2; NVIDIA H200; Xeon x2)" in s["note"]
    assert "evaluated on different machines" in render_table(tmp_path, "markdown", steps=True)
    code, out, _ = cli(["table", tmp_path, "--format", "csv"], capsys)
    assert code == 0 and "machines" in out.splitlines()[0].split(",") and "EPYC x2; NVIDIA H200; Xeon x2" in out

    same = tmp_path / "same"
    for seed in range(3):
        for i, variant in enumerate("ab"):
            write_run(same, "abl", variant, seed, metrics_for(50.0 - 10 * i + seed, seed, machine=xeon),
                      variant_index=i)
    assert "machines" not in step_statistics(collect(same)[0]).iloc[0]["note"]


def test_machine_label_reads_what_was_recorded_and_nothing_else():
    from dimr_lab.provenance import machine, machine_label

    m = machine()
    assert isinstance(m["cpu"], str) and m["cpu"] and isinstance(m["cpus"], int) and m["cpus"] >= 1
    assert machine_label({"cpu": "Xeon", "cpus": 2, "accelerator": None}) == "Xeon x2"
    assert machine_label({"cpu": "Xeon", "cpus": 16, "accelerator": "NVIDIA H200"}) == "NVIDIA H200"
    assert machine_label({"cpu": "Xeon"}) == "Xeon"
    for bad in (None, "Xeon", [], {}, {"cpu": 3, "cpus": 2}, {"cpu": "", "accelerator": ""}):
        assert machine_label(bad) is None, bad


def test_an_ablation_without_a_title_is_named_once(tmp_path):
    """A file without [ablation] title printed 'Steps: abl (abl)' and plotted 'abl (abl)'."""
    for seed in range(2):
        for i, (variant, fid) in enumerate((("a", 50.0), ("b", 40.0))):
            write_run(tmp_path, "abl", variant, seed, metrics_for(fid + seed, seed), variant_index=i, title="")
            write_run(tmp_path, "named", variant, seed, metrics_for(fid + seed, seed), variant_index=i,
                      title="A question")
    text = render_table(tmp_path, "rich", steps=True)
    assert "Steps: abl —" in text and "(abl)" not in text and "Steps: A question (named)" in text
    assert "## Steps: abl\n" in render_table(tmp_path, "markdown", steps=True)
    from dimr_lab.table.plots import _named

    assert _named("abl", "abl") == "abl" and _named("A question", "named") == "A question (named)"


def test_steps_pair_runs_at_the_same_step_only(tmp_path):
    for seed in range(3):
        write_run(tmp_path, "abl", "a", seed, metrics_for(50.0 + seed, seed), variant_index=0)
        write_run(tmp_path, "abl", "b", seed, metrics_for(40.0 + seed, seed), variant_index=1,
                  step=300 if seed == 2 else 600)  # seed 2 of b is behind
    s = step_statistics(collect(tmp_path)[0]).iloc[0]
    assert s["n"] == 2 and s["diff"] == pytest.approx(-10.0) and "1 of 3 seeds not paired" in s["note"]
    assert "evaluated at steps 300–600" in render_table(tmp_path, "rich")  # and the title line says so


def test_steps_never_pair_evaluations_with_other_settings(tmp_path):
    # b's seeds 0-2 were evaluated on 256 samples, a's on 1024: FIDs of different sample counts are no pair
    for seed in range(4):
        write_run(tmp_path, "abl", "a", seed, metrics_for(50.0 + seed, seed), variant_index=0,
                  spec=make_spec(seed, eval__samples=1024))
        write_run(tmp_path, "abl", "b", seed, metrics_for(40.0 + seed * 1.5, seed), variant_index=1,
                  spec=make_spec(seed, eval__samples=1024 if seed == 3 else 256))
    s = step_statistics(collect(tmp_path)[0]).iloc[0]
    assert s["n"] == 1 and s["diff"] == pytest.approx(-8.5)
    assert "3 of 4 seeds not paired: seeds 0, 1, 2 evaluated with other settings (eval.samples 1024 vs 256)" \
        in s["note"]


def test_steps_say_why_no_seed_is_paired_and_name_seeds_without_a_value(tmp_path):
    for seed in range(3):
        write_run(tmp_path / "behind", "abl", "a", seed, metrics_for(50.0 + seed, seed), variant_index=0)
        write_run(tmp_path / "behind", "abl", "b", seed, metrics_for(40.0 + seed, seed), variant_index=1, step=300)
        write_run(tmp_path / "gap", "abl", "a", seed, metrics_for(50.0 + seed, seed), variant_index=0)
        write_run(tmp_path / "gap", "abl", "b", seed, metrics_for(None if seed == 2 else 40.0 + seed, seed),
                  variant_index=1)
    s = step_statistics(collect(tmp_path / "behind")[0]).iloc[0]
    assert s["n"] == 0 and s["note"] == ("3 of 3 seeds not paired: seeds 0, 1, 2 evaluated at step 600 (a) vs 300 "
                                         "(b): --step N compares both at a step they evaluated, --pair a@600:b@300 "
                                         "each at its own")
    s = step_statistics(collect(tmp_path / "gap")[0]).iloc[0]
    assert s["n"] == 2 and s["note"] == "seed 2 without a fid value on one side, left out"


def test_no_published_sign_between_rows_of_different_published_tables(tmp_path):
    # main_results' tiny profile: G/2R (ImageNet 256) and XL/3R (ImageNet 512) on the same CPU data; their
    # published FIDs (1.63, 2.89) differ in dataset and protocol, so their difference is no sign to test
    refs = {"g_2r": {"table": "imagenet256", "model": "DiMR-G/2R", "epochs": 800},
            "xl_3r": {"table": "imagenet512", "model": "DiMR-XL/3R", "epochs": 800}}
    for seed in range(4):
        for index, (variant, paper) in enumerate(refs.items()):
            write_run(tmp_path, "main", variant, seed, metrics_for(50.0 + 10 * index + seed + 0.1 * seed ** 2, seed),
                      variant_index=index, paper=paper)
    s = step_statistics(collect(tmp_path)[0]).iloc[0]
    assert s["n"] == 4 and s["p_t"] < 0.05
    assert s["paper_diff"] is None or math.isnan(s["paper_diff"])
    assert s["verdict"] == "no published sign" and "different tables (imagenet256 vs imagenet512)" in s["note"]


def test_steps_csv_columns(tree, capsys):
    code, out, err = cli(["table", tree, "--steps", "--format", "csv"], capsys)
    assert code == 0 and err == ""
    steps = pd.read_csv(io.StringIO(out))
    assert list(steps.columns[:len(STEP_COLUMNS)]) == list(STEP_COLUMNS)
    assert list(steps["step"]) == ["adaln → tdln", "tdln → ln_token"] and steps["n"].iloc[0] == 3
    assert steps["paper_diff"].iloc[0] == pytest.approx(5.21 - 7.91)


# ------------------------------------------------------------------------------------ CLI

def test_cli_renders_writes_and_warns_on_stderr(tree, tmp_path, capsys):
    code, out, err = cli(["table", tree, "--format", "markdown"], capsys)
    assert code == 0 and "3.70 ± 0.10" in out and err == ""
    write_run(tree, "norm", "tdln", 9, None)
    target, png = tmp_path / "table.csv", tmp_path / "fid.png"
    code, out, err = cli(["table", tree, "--format", "csv", "--out", target, "--plot", png, "--metrics", "fid"], capsys)
    assert code == 0 and out == "" and len(pd.read_csv(target)) == 3 and png.read_bytes()[:8] == PNG
    assert err.startswith("warning: ") and err.count("\n") == 1 and "unfinished" in err


@pytest.mark.parametrize("case", ["missing", "unfinished", "format", "test", "out"])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, case):
    if case != "missing":
        write_run(tmp_path, "abl", "v", 0, None if case == "unfinished" else metrics_for(3.0))
    extra = {"missing": [], "unfinished": [], "format": ["--format", "html"], "test": ["--test", "z"],
             "out": ["--out", tmp_path]}[case]
    code, out, err = cli(["table", tmp_path / "nope" if case == "missing" else tmp_path, *extra], capsys)
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and errors[0].startswith("error: ")
    if case == "unfinished":
        assert "no finished runs" in errors[0]


def test_pairs_replace_the_default_steps_and_holm_counts_only_them(tree, capsys):
    """--pair FROM:TO: the comparison a question needs (a matched variant against the other norm, say) when it
    is neither a published step nor against the baseline; the verdict still reads the paper's sign where both
    sides are published in one table."""
    runs = collect(tree)[0]
    default = step_statistics(runs)
    assert "ln_token → adaln" not in set(default["step"])
    stats = step_statistics(runs, compare=[("ln_token", "adaln"), ("tdln", "adaln")])
    assert list(stats["step"]) == ["ln_token → adaln", "tdln → adaln"]
    got = stats.set_index("step")
    assert got.loc["ln_token → adaln", "diff"] == pytest.approx(4.2 - 5.5)
    assert got.loc["ln_token → adaln", "verdict"] == "no published sign"  # ln_token has no published row
    assert got.loc["tdln → adaln", "paper_diff"] == pytest.approx(7.91 - 5.21)  # Table 2 rows 4 -> 3
    raw = sorted(stats["p_t"])
    assert stats["p_holm"].min() == pytest.approx(min(1.0, 2 * raw[0]))  # Holm over the two pairs given
    alone = step_statistics(runs, compare=[("ln_token", "adaln")]).iloc[0]
    assert alone["p_holm"] == pytest.approx(alone["p_t"])  # one pair: nothing to correct for
    code, out, err = cli(["table", tree, "--steps", "--pair", "ln_token:adaln", "--format", "markdown"], capsys)
    assert code == 0 and "ln_token → adaln" in out and "tdln → adaln" not in out and "k = 1 steps" in out


@pytest.mark.parametrize("extra, says", [
    (["--steps", "--pair", "tdln:adaln_zro"], "unknown variant 'adaln_zro'"),
    (["--steps", "--pair", "tdln"], "give FROM:TO"),
    (["--steps", "--pair", "tdln:tdln"], "give FROM:TO"),
    (["--pair", "tdln:adaln"], "only with --steps"),
    (["--steps", "--pair", "tdln:adaln", "--pair", "adaln:tdln"], "the same comparison reversed"),
])
def test_a_bad_pair_is_one_line_and_exit_2(tree, capsys, extra, says):
    code, out, err = cli(["table", tree, *extra], capsys)
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and says in errors[0], err


def test_a_pair_from_two_ablations_is_not_compared(tree, capsys):
    """Pairs compare within one ablation: variants that exist only in different ablations are no step."""
    for seed in range(3):
        write_run(tree, "other", "wide", seed, metrics_for(3.0 + seed, seed), variant_index=0)
        write_run(tree, "other", "narrow", seed, metrics_for(4.0 + seed, seed), variant_index=1)
    code, out, err = cli(["table", tree, "--steps", "--pair", "tdln:wide"], capsys)
    assert code == 2 and "no ablation under" in err and "tdln:wide" in err
    code, out, err = cli(["table", tree, "--steps", "--pair", "narrow:wide", "--format", "csv"], capsys)
    assert code == 0 and len(pd.read_csv(io.StringIO(out))) == 1


@pytest.mark.parametrize("option", ["--out", "--plot", "--curves"])
def test_cli_refuses_to_overwrite_a_file_without_force(tree, tmp_path, capsys, option):
    # `--out RESULTS.md` or a committed curves.png: an existing file is replaced only with --force
    target = tmp_path / ("table.md" if option == "--out" else "fig.png")
    target.write_text("kept")
    code, out, err = cli(["table", tree, option, target], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "--force" in err, err
    assert target.read_text() == "kept"
    code, out, err = cli(["table", tree, option, target, "--force"], capsys)
    assert code == 0 and target.read_bytes() != b"kept", err


def test_a_results_path_that_is_a_file_is_not_said_to_be_missing(tmp_path, capsys):
    (tmp_path / "results.txt").write_text("x")
    code, out, err = cli(["table", tmp_path / "results.txt"], capsys)
    assert code == 2 and out == "" and err.strip().endswith("is a file, not a folder") and err.count("\n") == 1


# ------------------------------------------------------------------------------------ no torch

def test_the_table_layer_never_imports_torch(tree, tmp_path):
    script = textwrap.dedent(f"""
        import sys

        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is refused in this test")

        sys.meta_path.insert(0, NoTorch())
        from dimr_lab.table import render_table
        root = {str(tree)!r}
        assert "3.70" in render_table(root, "rich")
        assert "adaln" in render_table(root, "markdown", steps=True)
        render_table(root, "csv", plot={str(tmp_path / "p.png")!r}, curves={str(tmp_path / "c.png")!r})
        assert "torch" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_a_plain_table_reads_each_file_once_and_leaves_the_statistics_unloaded(tree):
    # a results tree of hundreds of runs: each record and metrics file read once (for the table and its
    # learning curves alike), and scipy (whose import takes longer than a plain table's reading of them)
    # loaded only for --steps
    code = f"""
        from dimr_lab.table import render_table
        assert "3.70" in render_table({str(tree)!r}, "rich")
        import sys
        assert "scipy" not in sys.modules, "a plain table loaded scipy"
        render_table({str(tree)!r}, "csv", curves={str(tree.parent / "curves.png")!r})
        assert "scipy" not in sys.modules, "a csv table loaded scipy"
    """
    opened, modules = opens_and_modules(code, tree)
    runs = [p.relative_to(tree) for p in sorted(tree.rglob("run.json"))]
    assert len(runs) == 9
    read = {f for f in opened if f.endswith(".json")}
    assert {str(r) for r in runs} <= read and any(f.endswith("/metrics.json") for f in read)
    assert set(opened.values()) == {2}, opened  # once per table made (its curves too), twice in all
    assert not {"torch", "scipy"} & modules
    _, modules = opens_and_modules(f"""
        from dimr_lab.table import render_table
        assert "adaln" in render_table({str(tree)!r}, "markdown", steps=True)
    """, tree)
    assert "scipy" in modules  # the statistics are still there, loaded when asked for


def test_a_table_without_curves_holds_one_run_in_memory_at_a_time(tree, tmp_path, monkeypatch):
    # a tree of hundreds of runs: each is dropped once it is a row; only --curves, which reads the tree once
    # for the table and the curves, keeps them all
    import gc
    import importlib
    import weakref

    collect_module = importlib.import_module("dimr_lab.table.collect")  # dimr_lab.table.collect is the function

    refs: list[weakref.ref] = []
    alive_before_each: list[int] = []
    real = collect_module._read_run

    def read(folder, warnings):
        gc.collect()
        alive_before_each.append(sum(r() is not None for r in refs))
        run = real(folder, warnings)
        refs.append(weakref.ref(run))
        return run

    monkeypatch.setattr(collect_module, "_read_run", read)
    render_table(tree, "csv", on_warning=lambda line: None)
    assert len(alive_before_each) == 9 and max(alive_before_each) <= 1, alive_before_each
    refs.clear(), alive_before_each.clear()
    render_table(tree, "csv", on_warning=lambda line: None, curves=tmp_path / "curves.png")
    assert alive_before_each == list(range(9))  # read once, for both


def test_an_interval_end_near_zero_never_reads_zero():
    from dimr_lab.table.steps import _interval

    assert _interval(-2.3, -4.61, -0.032, 1) == "-2.3 [-4.6, -0.032]"
    assert _interval(-2.3, -4.61, 0.0, 1) == "-2.3 [-4.6, +0.0]" and _interval(1.0, 0.5, 1.5, 1) == "+1.0 [+0.5, +1.5]"
    # nor does a difference: a sample accuracy lower by 0.0002 printed '-0.000'
    assert _interval(-0.0002, -0.005, 0.005, 3) == "-0.0002 [-0.005, +0.005]"
    assert _interval(0.0, -0.005, 0.005, 3) == "+0.000 [-0.005, +0.005]"


def _wobble(seed: int) -> float:
    return 0.1 * seed * (-1) ** seed


WOBBLE = statistics.mean(_wobble(s) for s in range(4))


def _compute_tree(root: Path) -> Path:
    """abl: 'single' evaluated at 600, 1200 and 1320, 'multi' at 300 and 600 (its steps cost 2.2x); at equal
    steps multi is 10 lower, at equal compute (single@1320 vs multi@600) single is 2 lower, and single still
    improves from 600 to 1200 by 5, each plus or minus a per-seed wobble (mean WOBBLE)."""
    for seed in range(4):
        e = _wobble(seed)
        single = write_run(root, "abl", "single", seed, metrics_for(50.0 + seed, seed), variant_index=0,
                           paper={"table": T2, "row": 2})
        add_eval(single, 1200, metrics_for(45.0 + seed + e, seed), make_spec(seed))
        add_eval(single, 1320, metrics_for(38.0 + seed - e, seed), make_spec(seed))
        multi = write_run(root, "abl", "multi", seed, metrics_for(40.0 + seed + e, seed), variant_index=1,
                          paper={"table": T2, "row": 3})
        add_eval(multi, 300, metrics_for(47.0 + seed, seed), make_spec(seed))
    return root


def test_a_pair_at_named_steps_pairs_each_side_at_its_own_step(tmp_path, capsys):
    """--pair FROM@S:TO@T: a comparison at matched training compute (the single-branch network trained 2.2x
    the steps of the multi-branch one) or of one variant with itself at two steps (is it still improving?),
    paired by seed; Holm over the pairs given; the default steps (each run's last evaluation: single at 1320,
    multi at 600) are not paired at all."""
    root = _compute_tree(tmp_path)
    default = step_statistics(collect(root)[0]).iloc[0]
    assert default["n"] == 0 and "evaluated at step 1320 (single) vs 600 (multi)" in default["note"]
    hint = default["note"].split("--pair ")[1].split()[0]  # the note's own --pair, as given on the command line
    assert hint == "single@1320:multi@600"
    code, out, err = cli(["table", root, "--steps", "--format", "csv", "--pair", "single@1320:multi@600",
                          "--pair", "single@600:single@1200", "--pair", "single@600:multi@600"], capsys)
    assert code == 0 and err == "", err
    got = pd.read_csv(io.StringIO(out)).set_index("step")
    assert list(got.index) == ["single@1320 → multi@600", "single@600 → single@1200", "single@600 → multi@600"]
    compute, itself, equal = (got.loc[k] for k in got.index)
    assert compute["n"] == 4 and compute["diff"] == pytest.approx(2.0 + 2 * WOBBLE) and compute["t_lo"] > 0
    assert (compute["from_step"], compute["to_step"]) == (1320, 600)
    assert compute["paper_diff"] == pytest.approx(7.91 - 5.44)  # rows 2 -> 3, read with a note
    assert "the paper's difference is at equal training" in compute["note"]
    assert itself["diff"] == pytest.approx(-5.0 + WOBBLE) and math.isnan(itself["paper_diff"])
    assert itself["verdict"] == "no published sign" and "a variant against itself" in itself["note"]
    assert equal["diff"] == pytest.approx(-10.0 + WOBBLE) and equal["verdict"] == "disagrees"
    raw = sorted(got["p_t"])
    assert got["p_holm"].min() == pytest.approx(min(1.0, 3 * raw[0]))  # Holm over the three pairs
    code, out, err = cli(["table", root, "--steps", "--format", "markdown", "--pair", "single@1320:multi@600"],
                         capsys)
    assert code == 0 and "single@1320 → multi@600" in out and "pairs each seed's evaluation" in out


def test_a_pair_at_a_step_a_seed_lacks_names_that_seed(tmp_path, capsys):
    root = _compute_tree(tmp_path)
    extra = write_run(root, "abl", "single", 7, metrics_for(50.0, 7), variant_index=0)  # no evaluation at 1320
    assert extra.is_dir()
    code, out, err = cli(["table", root, "--steps", "--format", "csv", "--pair", "single@1320:multi@600",
                          "--pair", "single@600:multi@600"], capsys)
    assert code == 0, err
    got = pd.read_csv(io.StringIO(out)).set_index("step")
    assert got.loc["single@1320 → multi@600", "n"] == 4  # seed 7 has no partner at 600 either way
    assert "seed 7 of single at step 600 without a partner" in got.loc["single@600 → multi@600", "note"]
    code, out, err = cli(["table", root, "--steps", "--format", "csv", "--pair", "single@600:single@1200"], capsys)
    assert code == 0, err
    assert "seed 7 of single at step 600 without a partner" in pd.read_csv(io.StringIO(out))["note"].iloc[0]


@pytest.mark.parametrize("pair, says", [
    ("single@1300:multi@600", "no run of single under"),
    ("single@1320:multi@600 --step 600", "give --step or the steps, not both"),
    ("single@1320:multi", "a training step on both sides or on neither"),
    ("single@x:multi@600", "a whole number"),
    ("single@600:single@600", "one variant at two training steps"),
    ("@600:multi@600", "a whole number"),
    ("single@１３２０:multi@600", "a whole number"),
])
def test_a_bad_pair_at_steps_is_one_line_and_exit_2(tmp_path, capsys, pair, says):
    pair, *extra = pair.split()
    code, out, err = cli(["table", _compute_tree(tmp_path), "--steps", "--pair", pair, *extra], capsys)
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and says in errors[0], err
    if "no run" in says:
        assert "(its evaluated steps: 600, 1200, 1320)" in errors[0]


def test_a_pair_at_steps_given_also_reversed_is_refused(tmp_path, capsys):
    code, out, err = cli(["table", _compute_tree(tmp_path), "--steps", "--pair", "single@1320:multi@600",
                          "--pair", "multi@600:single@1320"], capsys)
    assert code == 2 and "multi@600:single@1320" in err and "the same comparison reversed" in err
    code, out, err = cli(["table", _compute_tree(tmp_path / "b"), "--steps", "--format", "csv",
                          "--pair", "single@1320:multi@600", "--pair", "single@600:multi@300"], capsys)
    assert code == 0 and len(pd.read_csv(io.StringIO(out))) == 2  # other steps: another comparison
