"""`dimr-lab table`: collecting runs, mean ± std over seeds, deltas, paper columns, every output format, the CLI."""

from __future__ import annotations

import io
import json
import math
import os
import statistics
from pathlib import Path

import pandas as pd
import pytest

from dimr_lab.errors import UserError
from dimr_lab.table import aggregate, collect, format_table, paper_row, render_table

# variant -> (variant_index, fids of seeds 0..2, paper reference); tdln is the declared base though not first
NORM = {
    "adaln": (0, [4.0, 4.2, 4.4], {"table": "table2_ablation_imagenet64", "row": 3}),
    "tdln": (1, [3.6, 3.7, 3.8], {"table": "table2_ablation_imagenet64", "row": 4}),
    "ln_token": (2, [5.0, 5.5, 6.0], None),
}


def write_run(root: Path, ablation: str, variant: str, seed: int, metrics: dict | None, *, tag: str = "abc",
              **run_fields) -> Path:
    """One run folder as the runner writes it; metrics None leaves it unfinished."""
    folder = root / ablation / f"{variant}-s{seed}-{tag}{seed}"
    folder.mkdir(parents=True)
    run = {"ablation": ablation, "title": f"{ablation} ablation", "variant": variant, "seed": seed, "grid": {},
           "factors": {}, "paper": None, "profile": "tiny", "baseline": None, **run_fields}
    (folder / "run.json").write_text(json.dumps(run))
    (folder / "spec.json").write_text(json.dumps({"model": {}, "data": {}, "train": {"seed": seed}}))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def metrics_for(fid: float, seed: int, params: int = 130_900_000) -> dict:
    """A full metrics.json whose numbers derive from fid and seed."""
    return {"fid": fid, "kid": fid / 100, "kid_std": 0.001, "isc": 40.0 + seed, "isc_std": 0.5,
            "precision": 0.6 + 0.01 * seed, "recall": 0.5, "sample_accuracy": 0.9, "distortion_rate": 0.3,
            "params": params, "gmacs": 2.5, "train_images_per_s": 120.0 + seed, "steps": 100, "wall_s": 10.0,
            "eval": {"samples": 1000, "sampler": "ddim", "steps": 50, "guidance_scale": 1.0, "ema": True,
                     "feature_extractor": "inception-v3-compat"},
            "versions": {"torch": "2.4"}, "git_commit": "deadbeef"}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """results/norm: three variants x three seeds, base tdln, two variants mapped to Table 2."""
    root = tmp_path / "results"
    for variant, (index, fids, paper) in NORM.items():
        for seed, fid in enumerate(fids):
            write_run(root, "norm", variant, seed, metrics_for(fid, seed), variant_index=index, paper=paper,
                      baseline="tdln", title="TD-LN vs adaLN",
                      factors={"norm": variant.upper(), "conditioning": "norm"})
    return root


def row(table: pd.DataFrame, variant: str, ablation: str = "norm") -> pd.Series:
    """The aggregated row of one variant."""
    hit = table[(table["ablation"] == ablation) & (table["variant"] == variant)]
    assert len(hit) == 1, hit
    return hit.iloc[0]


# ---------------------------------------------------------------- aggregation


def test_mean_std_and_seed_count(tree):
    runs, warnings = collect(tree)
    assert warnings == [] and len(runs) == 9
    table = aggregate(runs)
    assert list(table["variant"]) == ["adaln", "tdln", "ln_token"]  # variant_index order, not names
    for variant, (_, fids, _) in NORM.items():
        r = row(table, variant)
        assert r["n_seeds"] == 3 and r["seeds"] == "0,1,2"
        assert r["fid_mean"] == pytest.approx(statistics.mean(fids))
        assert r["fid_std"] == pytest.approx(statistics.stdev(fids))
        assert r["kid_mean"] == pytest.approx(statistics.mean(fids) / 100)
        assert r["isc_mean"] == pytest.approx(41.0) and r["isc_std"] == pytest.approx(1.0)
        assert r["train_images_per_s_mean"] == pytest.approx(121.0)
        assert r["params_m_mean"] == pytest.approx(130.9) and r["gmacs_mean"] == pytest.approx(2.5)
        assert r["factor.norm"] == variant.upper() and r["factor.conditioning"] == "norm"


def test_deltas_against_declared_base(tree):
    table = aggregate(collect(tree)[0])
    assert list(table["base"]) == [False, True, False]
    base_fid = statistics.mean(NORM["tdln"][1])
    assert row(table, "tdln")["fid_delta"] == 0.0
    assert row(table, "adaln")["fid_delta"] == pytest.approx(statistics.mean(NORM["adaln"][1]) - base_fid)
    assert row(table, "ln_token")["fid_delta"] == pytest.approx(5.5 - base_fid)
    assert row(table, "ln_token")["kid_delta"] == pytest.approx((5.5 - base_fid) / 100)
    assert row(table, "adaln")["isc_delta"] == pytest.approx(0.0)


def test_base_defaults_to_first_variant_by_name(tmp_path):
    for variant, fid in (("zeta", 2.0), ("alpha", 3.0), ("mid", 5.0)):
        write_run(tmp_path, "abl", variant, 0, metrics_for(fid, 0))
    table = aggregate(collect(tmp_path)[0])
    assert list(table["variant"]) == ["alpha", "mid", "zeta"]
    assert list(table["base"]) == [True, False, False]
    assert list(table["fid_delta"]) == pytest.approx([0.0, 2.0, -1.0])
    assert math.isnan(row(table, "alpha", "abl")["fid_std"])  # one seed: no spread


def test_declared_base_without_finished_runs_gives_no_deltas(tmp_path):
    for variant in ("a", "b"):
        write_run(tmp_path, "abl", variant, 0, metrics_for(3.0, 0), baseline="gone")
    table = aggregate(collect(tmp_path / "abl")[0])  # one ablation folder works as well as a tree
    assert not table["base"].any() and table["fid_delta"].isna().all()
    assert "ΔFID" not in format_table(table, "markdown")


def test_paper_columns_for_mapped_rows_only(tree):
    table = aggregate(collect(tree)[0])
    tdln, adaln, token = row(table, "tdln"), row(table, "adaln"), row(table, "ln_token")
    assert (tdln["paper_fid"], tdln["paper_params_m"]) == (5.21, 154.0)
    assert (adaln["paper_fid"], adaln["paper_params_m"]) == (7.91, 217.9)
    assert tdln["paper_ref"] == "table2_ablation_imagenet64 row 4"
    assert math.isnan(token["paper_fid"]) and math.isnan(token["paper_params_m"])
    assert token["paper_ref"] is None or pd.isna(token["paper_ref"])


def test_paper_references_by_model_and_epochs():
    big = paper_row({"table": "imagenet256", "model": "DiMR-XL/2R", "epochs": 800})
    assert (big["paper_fid"], big["paper_is"], big["paper_params_m"], big["paper_gflops"]) == (1.70, 289.0, 505, 160)
    assert (big["paper_precision"], big["paper_recall"]) == (0.79, 0.63)
    assert paper_row({"table": "imagenet64", "model": "DiMR-M/3R"})["paper_is"] == 42.41
    assert paper_row({"table": "imagenet512", "model": "DiMR-XL/3R", "epochs": 400})["paper_fid"] == 3.23
    assert paper_row({"table": "distortion_rate", "model": "DiMR-XL/2R", "epochs": 400})[
        "paper_distortion_rate"] == 0.292
    for bad in ({"table": "imagenet256", "model": "DiMR-XL/2R"},  # two epochs published: ambiguous
                {"table": "table2_ablation_imagenet64", "row": 9}, {"table": "imagenet64", "row": 1},
                {"table": "../../etc/passwd", "row": 1}, {"row": 1}, "table2"):
        with pytest.raises(UserError):
            paper_row(bad)


def test_bad_paper_reference_warns_and_keeps_the_run(tmp_path):
    for seed in range(2):
        write_run(tmp_path, "abl", "v", seed, metrics_for(3.0, seed), paper={"table": "table2_ablation_imagenet64",
                                                                             "row": 42})
    runs, warnings = collect(tmp_path)
    assert len(runs) == 2 and len(warnings) == 1 and "row 42" in warnings[0] and "v-s0" in warnings[0]
    assert math.isnan(aggregate(runs)["paper_fid"].iloc[0])


def test_grid_points_are_rows_compared_at_the_same_point(tmp_path):
    for variant, offset in (("base", 0.0), ("other", 1.0)):
        for lr, fid in ((1e-3, 3.0), (3e-4, 4.0)):
            write_run(tmp_path, "g", variant, 0, metrics_for(fid + offset, 0), tag=f"lr{lr}-",
                      grid={"train.lr": lr}, baseline="base")
    table = aggregate(collect(tmp_path)[0])
    assert len(table) == 4 and list(table["grid.train.lr"]) == [3e-4, 1e-3, 3e-4, 1e-3]
    assert list(table["fid_delta"]) == pytest.approx([0.0, 0.0, 1.0, 1.0])


def test_missing_and_non_numeric_metrics(tmp_path):
    fids = [3.0, None, 5.0]
    for seed, fid in enumerate(fids):
        m = metrics_for(fid or 0, seed)
        m["fid"] = fid
        del m["distortion_rate"]
        if seed == 2:
            m["recall"] = "n/a"
        write_run(tmp_path, "abl", "v", seed, m)
    runs, warnings = collect(tmp_path)
    assert len(warnings) == 1 and "recall" in warnings[0] and "v-s2" in warnings[0]
    r = aggregate(runs).iloc[0]
    assert r["n_seeds"] == 3 and r["fid_mean"] == pytest.approx(4.0)
    assert math.isnan(r["distortion_rate_mean"]) and r["recall_mean"] == pytest.approx(0.5)
    assert "Distortion" not in format_table(aggregate(runs), "markdown")  # empty columns are left out


def test_superseded_run_of_the_same_seed_is_dropped(tmp_path):
    old = write_run(tmp_path, "abl", "v", 0, metrics_for(9.0, 0), tag="old")
    new = write_run(tmp_path, "abl", "v", 0, metrics_for(3.0, 0), tag="new")
    os.utime(old / "metrics.json", (1_000_000, 1_000_000))
    runs, warnings = collect(tmp_path)
    assert list(runs["folder"]) == [str(new)]
    assert len(warnings) == 1 and str(old) in warnings[0] and str(new) in warnings[0]


# ---------------------------------------------------------------- broken folders


def test_corrupt_and_unfinished_runs_warn_and_the_rest_renders(tree):
    bad_metrics = write_run(tree, "norm", "tdln", 7, None)
    (bad_metrics / "metrics.json").write_text('{"fid": 3.')
    bad_run = write_run(tree, "norm", "adaln", 8, metrics_for(1.0, 8))
    (bad_run / "run.json").write_text("not json")
    unfinished = write_run(tree, "norm", "adaln", 9, None)
    no_seed = write_run(tree, "norm", "adaln", 10, metrics_for(1.0, 0))
    (no_seed / "run.json").write_text(json.dumps({"ablation": "norm", "variant": "adaln"}))
    listed = write_run(tree, "norm", "adaln", 11, metrics_for(1.0, 0))
    (listed / "metrics.json").write_text("[1, 2]")
    runs, warnings = collect(tree)
    assert len(runs) == 9 and len(warnings) == 5
    for folder, why in ((bad_metrics, "metrics.json is not valid JSON"), (bad_run, "run.json is not valid JSON"),
                        (unfinished, "unfinished"), (no_seed, "'seed'"), (listed, "not a JSON object")):
        assert any(str(folder) in w and why in w for w in warnings), (folder, warnings)
    seen = []
    text = render_table(tree, "markdown", on_warning=seen.append)
    assert seen == warnings
    assert row(aggregate(runs), "adaln")["n_seeds"] == 3 and "| adaln |" in text


def test_missing_dir_and_no_finished_runs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        collect(tmp_path / "nope")
    write_run(tmp_path, "abl", "v", 0, None)
    seen = []
    with pytest.raises(UserError, match="no finished runs"):
        render_table(tmp_path, on_warning=seen.append)
    assert len(seen) == 1 and "unfinished" in seen[0]
    with pytest.raises(UserError, match="table format"):
        render_table(tmp_path, fmt="html")


# ---------------------------------------------------------------- output formats


@pytest.fixture
def two_ablations(tree) -> Path:
    """tree plus a second ablation with two single-seed variants."""
    for variant, fid in (("conv", 8.0), ("attn", 6.5)):
        write_run(tree, "branch", variant, 0, metrics_for(fid, 0), title="Branch_type & 100%")
    return tree


def test_csv_round_trips(two_ablations):
    table = aggregate(collect(two_ablations)[0])
    back = pd.read_csv(io.StringIO(render_table(two_ablations, "csv")))
    assert list(back.columns) == list(table.columns)
    assert list(back["ablation"]) == ["branch", "branch", "norm", "norm", "norm"]
    norm = back[back["ablation"] == "norm"].set_index("variant")
    assert norm.loc["tdln", "fid_mean"] == pytest.approx(3.7) and norm.loc["tdln", "fid_std"] == pytest.approx(0.1)
    assert norm.loc["adaln", "paper_fid"] == 7.91 and pd.isna(norm.loc["ln_token", "paper_fid"])
    assert norm.loc["ln_token", "n_seeds"] == 3


def test_markdown_has_a_heading_header_and_row_per_variant(two_ablations):
    text = render_table(two_ablations, "markdown")
    sections = {s.split("\n", 1)[0]: s for s in text.split("\n## ")}
    assert set(sections) == {"## Branch_type & 100% (`branch`)", "TD-LN vs adaLN (`norm`)"}
    lines = [line for line in sections["TD-LN vs adaLN (`norm`)"].splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:4] == ["Variant", "norm", "conditioning", "Seeds"] and "Paper FID" in header
    assert set(lines[1]) <= set("|:-") and len(lines) == 2 + 3
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in lines[2:]}
    assert set(cells) == {"adaln", "tdln (base)", "ln_token"}
    fid = header.index("FID")
    assert cells["tdln (base)"][fid] == "3.70 ± 0.10" and cells["ln_token"][fid] == "5.50 ± 0.50"
    assert cells["adaln"][header.index("ΔFID")] == "+0.50" and cells["tdln (base)"][header.index("ΔFID")] == "base"
    assert cells["tdln (base)"][header.index("Paper FID")] == "5.21" and cells["ln_token"][header.index("Paper FID")] == ""
    assert cells["adaln"][header.index("Params (M)")] == "130.9"
    branch = [line for line in sections["## Branch_type & 100% (`branch`)"].splitlines() if line.startswith("| ")]
    assert "8.00" in branch[2] and "±" not in branch[2]  # one seed: no spread shown


def test_latex_is_booktabs_with_escapes(two_ablations):
    text = render_table(two_ablations, "latex")
    assert text.count(r"\toprule") == 2 and text.count(r"\bottomrule") == 2 and text.count(r"\midrule") == 2
    assert r"3.70 $\pm$ 0.10" in text and r"$\Delta$FID" in text and r"ln\_token" in text
    assert r"Branch\_type" not in text  # titles are comments, not cells
    norm = text[text.index("(norm)"):]
    body = norm[norm.index(r"\midrule"):norm.index(r"\bottomrule")].strip().splitlines()[1:]
    assert len(body) == 3 and all(line.endswith(r"\\") for line in body)


def test_rich_has_titles_and_numbers(two_ablations):
    text = render_table(two_ablations, "rich")
    assert "TD-LN vs adaLN (norm)" in text and "Branch_type & 100% (branch)" in text
    assert "3.70 ± 0.10" in text and "tdln (base)" in text and "7.91" in text


def test_plot_is_a_png(two_ablations, tmp_path):
    out = tmp_path / "fid.png"
    render_table(two_ablations, "csv", plot=out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="cannot write the plot"):
        render_table(two_ablations, "csv", plot=tmp_path / "missing" / "fid.png")


# ---------------------------------------------------------------- CLI


def cli(*args: str) -> int:
    """Run `dimr-lab table ARGS` through the real entry point; its exit status."""
    import typer.main

    from dimr_lab.cli import app, main

    # typer runs a lone registered command without its name; with the other command modules it is a group
    lone = not hasattr(typer.main.get_command(app), "commands")
    try:
        main(list(args) if lone else ["table", *args])
    except SystemExit as exit_:
        return exit_.code or 0
    return 0


def test_cli_renders_and_writes(tree, tmp_path, capsys):
    assert cli(str(tree), "--format", "markdown") == 0
    out = capsys.readouterr()
    assert "3.70 ± 0.10" in out.out and out.err == ""
    target, png = tmp_path / "table.csv", tmp_path / "fid.png"
    assert cli(str(tree), "--format", "csv", "--out", str(target), "--plot", str(png)) == 0
    assert capsys.readouterr().out == ""
    assert len(pd.read_csv(target)) == 3 and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_warnings_go_to_stderr_and_the_table_still_renders(tree, capsys):
    broken = write_run(tree, "norm", "tdln", 5, None)
    (broken / "metrics.json").write_text("{")
    assert cli(str(tree), "--format", "csv") == 0
    out = capsys.readouterr()
    assert out.err.count("\n") == 1 and str(broken) in out.err
    assert len(pd.read_csv(io.StringIO(out.out))) == 3


@pytest.mark.parametrize("case", ["missing", "empty", "unfinished", "format", "out"])
def test_cli_user_errors_exit_2(tmp_path, capsys, case):
    args = {"missing": [str(tmp_path / "nope")], "empty": [str(tmp_path)], "unfinished": [str(tmp_path)],
            "format": [str(tmp_path), "--format", "html"], "out": [str(tmp_path), "--out", str(tmp_path)]}[case]
    if case in ("unfinished", "format", "out"):
        write_run(tmp_path, "abl", "v", 0, None if case == "unfinished" else metrics_for(3.0, 0))
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    if case == "unfinished":
        assert "unfinished" in err and "no finished runs" in err


# ---------------------------------------------------------------- steps between paper rows


def test_steps_between_published_rows(tree, tmp_path):
    """adaln (row 3, 7.91) -> tdln (row 4, 5.21): paper -2.70; ours 4.2 -> 3.7 = -0.5 with disjoint ranges."""
    from dimr_lab.table import format_steps, step_deltas

    steps = step_deltas(collect(tree)[0])
    assert list(steps["step"]) == ["adaln → tdln"], "ln_token has no published row: not a step"
    s = steps.iloc[0]
    assert s["ours_delta"] == pytest.approx(-0.5) and s["paper_delta"] == pytest.approx(5.21 - 7.91)
    assert s["beyond_spread"] and s["verdict"] == "agrees, beyond the seed spread"
    assert (s["from_min"], s["from_max"], s["to_min"], s["to_max"]) == (4.0, 4.4, 3.6, 3.8)
    text = format_steps(steps, "markdown")
    assert "| norm | tiny | adaln → tdln | 4.20 [4.00, 4.40] → 3.70 [3.60, 3.80] | -0.50 | -2.70 |" in text

    # overlapping seed ranges: within the spread; an opposite sign: 'opposite'
    root = tmp_path / "r2"
    for variant, (index, fids, paper) in {"adaln": (0, [4.0, 4.5, 5.0], NORM["adaln"][2]),
                                          "tdln": (1, [4.6, 4.8, 5.6], NORM["tdln"][2])}.items():
        for seed, fid in enumerate(fids):
            write_run(root, "norm", variant, seed, metrics_for(fid, seed), variant_index=index, paper=paper)
    s = step_deltas(collect(root)[0]).iloc[0]
    assert not s["beyond_spread"] and s["verdict"] == "opposite, within the seed spread"


def test_steps_cli(tree, tmp_path, capsys):
    from dimr_lab.cli import main

    main(["table", str(tree), "--steps", "--format", "markdown"])
    out = capsys.readouterr().out
    assert "adaln → tdln" in out and "agrees, beyond the seed spread" in out
    lone = tmp_path / "lone"
    write_run(lone, "norm", "tdln", 0, metrics_for(3.0, 0), paper=NORM["tdln"][2])
    with pytest.raises(SystemExit) as exit_:
        main(["table", str(lone), "--steps"])
    assert exit_.value.code == 2 and "no two variants with published numbers" in capsys.readouterr().err
