"""Run folders that hold under bad values, odd files and damage: every case gets one line, exit status 2,
nothing written; state read from damaged folders is never a traceback. (Kills, full disks and races:
test_faults.py.)"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli

TINY = ["--set", "train.steps=2", "--set", "eval.enabled=false", "--set", "sample.steps=2", "--set",
        "sample.grid_size=2", "--set", "data.train_size=64", "--set", "train.batch_size=8", "--no-progress"]


def one_line_exit_2(code: int, out: str, err: str, fragment: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (out, err)
    assert len(lines) == 1 and "Traceback" not in err + out, err
    assert fragment in err, err


# every check a run can make before training is made before anything is written
BEFORE_TRAINING = [
    (["--set", "train.batch_size=5000"], "larger than the dataset"),
    (["--set", "data.num_classes=9"], "data.num_classes"),
    (["--set", "model.num_classes=4"], "model.num_classes"),
    (["--set", "diffusion.loss_weights=[1.0, 2.0]"], "diffusion.loss_weights: has 2 entries"),
    (["--set", "model.in_channels=1"], "model.in_channels"),
    (["--set", "train.seed=4294967296"], "train.seed: must be <= 4294967295"),
    (["--set", "train.lr=nan"], "train.lr: must be a finite number"),
    (["--set", "train.ema_decay=nan"], "train.ema_decay: must be a finite number"),
    (["--set", "sample.guidance_scale=inf"], "sample.guidance_scale: must be a finite number"),
    (["--set", "diffusion.label_drop=nan"], "diffusion.label_drop: must be a finite number"),
    (["--set", "model.branches.0.width=400000"], "need at least"),
    (["--set", "eval.metrics=[\"fdi\"]", "--set", "eval.enabled=true"], "unknown metric 'fdi'"),
    (["--set", "eval.feature_extractor=\"inception-v3-compat\"", "--set", "eval.enabled=true"],
     "eval.inception_weights"),
    (["--set", "eval.reference_stats=\"/nope.npz\"", "--set", "eval.enabled=true"], "eval.reference_stats"),
    (["--set", "eval.steps=[100]"], "beyond train.steps"),
    (["--set", "data.name=\"folder\""], "data.root"),
    (["--set", "sample.sampler=\"ddim\"", "--set", "diffusion.schedule=\"vp_linear\""], "needs a discrete schedule"),
    (["--set", "diffusion.label_drop=0.0", "--set", "sample.guidance_scale=2.0"], "never trained"),
    (["--set", "sample.sampler=\"ddim\"", "--set", "sample.order=1", "--set", "sample.steps=1000"],
     "sample.steps: sampler 'ddim' takes distinct integer steps of the 1000-step schedule from t = 1 to t_end = "
     "0.001: at most 999, got 1000"),
    (["--set", "sample.guidance_power=0.0", "--set", "sample.guidance_schedule=\"power_cosine\""],
     "sample.guidance_power: must be > 0, got 0.0"),
    (["--set", "model.num_classes=0", "--set", "data.name=\"folder\"", "--set", "data.root=\"/nope\""],
     "sample.guidance_scale: guidance (scale 3.0) needs class labels; the network has none"),
    (["--set", "train.nosuch=1"], "--set: train.nosuch"),
    (["--set", "data.name=\"digits\"", "--set", "data.num_classes=5"], "only procedural datasets make fewer"),
    (["--set", "model.out_channels=6"], "model.out_channels: is 6"),
    # sizes that would overflow torch's storage size (or build blocks for hours) when the network is counted
    (["--set", "model.branches.0.width=4611686018427387904"], "model.branches[0].width: must be <= 1048576"),
    (["--set", "model.branches.0.mlp_width=4611686018427387904"], "model.branches[0].mlp_width: must be <="),
    (["--set", "model.num_classes=4611686018427387904"], "model.num_classes: must be <= 1000000"),
    (["--set", "model.branches.0.depth=4611686018427387904"], "model.branches[0].depth: must be <= 1024"),
    (["--set", "model.conditioning=\"adaln\"", "--set", "model.norm=\"adaln_zero\"", "--set",
      "model.outer_norm=\"layernorm\"", "--set", "model.time_embed_dim=4611686018427387904"],
     "model.time_embed_dim: must be <= 1048576"),
    # values that pass a range check alone and fail after training: a cosine decay up to a huge rate (NaN
    # loss), betas whose exp overflows the sampler, a reference set of 2**62 images
    (["--set", "train.lr_schedule=\"cosine\"", "--set", "train.lr_min=1e30"], "train.lr_min: must be <= 10.0"),
    (["--set", "train.lr_schedule=\"cosine\"", "--set", "train.lr_min=0.5"], "train.lr_min: must be at most train.lr"),
    (["--set", "diffusion.schedule=\"vp_linear\"", "--set", "sample.sampler=\"dpm_solver_fast\"", "--set",
      "sample.order=3", "--set", "diffusion.beta_max=1e308"], "diffusion.beta_max: must be <= 1000.0"),
    (["--set", "eval.enabled=true", "--set", "eval.reference_samples=4611686018427387904"],
     "eval.reference_samples: must be <= 10000000"),
    # a project name wandb refuses (it said so in a traceback, after the network was built)
    (["--set", "track.wandb=true", "--set", "track.wandb_project=\"me/dimr\""], "track.wandb_project: a wandb project"),
    (["--set", "track.wandb=true", "--set", "track.wandb_project=\"\""], "track.wandb_project: a wandb project"),
]


@pytest.mark.parametrize("args,fragment", BEFORE_TRAINING, ids=[f[1][:30] for f in BEFORE_TRAINING])
def test_a_bad_run_is_refused_before_anything_is_written(args, fragment, tmp_path, capsys):
    out = tmp_path / "run"
    code, o, e = cli(["train", "--out", out, *TINY, *args], capsys)
    one_line_exit_2(code, o, e, fragment)
    assert not out.exists()


def test_latents_without_their_vae_are_refused_before_training(tmp_path, capsys):
    """Even with evaluation off a run ends with a sample grid, decoded through data.vae: found at once."""
    import numpy as np

    root = tmp_path / "lat"
    root.mkdir()
    for i in range(8):
        pair = np.empty(2, dtype=object)
        pair[0], pair[1] = np.zeros((8, 16, 16), np.float32), np.int64(i % 2)
        np.save(root / f"{i}.npy", pair)
    out = tmp_path / "run"
    code, o, e = cli(["train", "--out", out, *TINY, "--set", 'data.name="latents"', "--set", f'data.root="{root}"',
                      "--set", "data.num_classes=2", "--set", "model.in_channels=4",
                      "--set", 'eval.feature_extractor="inception-v3-compat"', "--set", 'eval.metrics=["fid"]'], capsys)
    one_line_exit_2(code, o, e, "data.vae: latent samples become images")
    assert not out.exists()


def test_odd_output_folders_are_one_line(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    one_line_exit_2(*cli(["train", "--out", f, *TINY], capsys), "exists and is not a folder")
    one_line_exit_2(*cli(["train", "--out", f / "run", *TINY], capsys), "file is a file, not a folder")
    if os.geteuid() != 0:  # root writes anywhere: a read-only folder stops only others
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        one_line_exit_2(*cli(["train", "--out", ro / "run", *TINY], capsys), "not writable")


@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "dir"])
def test_spec_paths_that_are_not_regular_files_are_refused_at_once(special, tmp_path, capsys):
    path = {"/dev/zero": Path("/dev/zero"), "fifo": tmp_path / "spec.toml", "dir": tmp_path}[special]
    if special == "fifo":
        os.mkfifo(path)
    t0 = time.monotonic()
    code, o, e = cli(["train", path, "--out", tmp_path / "run"], capsys)
    one_line_exit_2(code, o, e, str(path))
    assert time.monotonic() - t0 < 60  # no read of an endless device, no wait on a FIFO
    code, o, e = cli(["describe", str(path)], capsys)
    assert code == 2


def test_describe_of_an_empty_file_is_an_error_not_the_default_network(tmp_path, capsys):
    empty = tmp_path / "m.toml"
    empty.write_text("")
    one_line_exit_2(*cli(["describe", empty], capsys), "no model in it")


def test_describe_names_a_bad_key_of_a_model_table_under_model(tmp_path, capsys):
    # README's model file is a [model] table: its typo is model.nrom, not a key at the top level
    path = tmp_path / "m.toml"
    path.write_text('[model]\npreset = "dimr_tiny_3r"\nnrom = "tdln"\n')
    code, o, e = cli(["describe", path], capsys)
    one_line_exit_2(code, o, e, "model.nrom: unknown key in [model]")
    assert "did you mean 'norm'" in e
    path.write_text('preset = "dimr_tiny_3r"\nnrom = "tdln"\n')  # model keys at the top level, as allowed
    one_line_exit_2(*cli(["describe", path], capsys), "nrom: unknown key in [(top level)]")


def test_describe_takes_a_run_folder(tmp_path, capsys):
    """A trained run's network could be described only by writing its model out as a TOML file again."""
    import json

    from dimr_lab.rundir import RunDir
    from dimr_lab.spec.run_spec import load_run_spec
    from dimr_lab.spec.schema import to_dict

    spec = load_run_spec(None, [("model.mlp", "mlp"), ("model.branches.1.depth", 4)])
    run = tmp_path / "mlp-s0-abc"
    run.mkdir()
    RunDir(run).write_spec_document(to_dict(spec), spec.identity_hash())
    code, out, err = cli(["describe", run, "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["spec"]["mlp"] == "mlp" and info["spec"]["branches"][1]["depth"] == 4
    code, out, err = cli(["describe", "dimr_tiny_3r", "--json"], capsys)
    assert json.loads(out)["params"] != info["params"]
    one_line_exit_2(*cli(["describe", tmp_path], capsys), "a folder without run.json or spec.json, not a run")
    (run / "spec.json").write_text('{"spec": {"model": {"preset": "dimr_tiny_3r", "nrom": "tdln"}}}')
    one_line_exit_2(*cli(["describe", run], capsys), "spec.json: model.nrom: unknown key")


def test_describe_takes_an_ablation_variant_under_a_profile(capsys):
    """`describe ABLATION.toml --variant V --profile P`: the network that variant builds there, per branch, as a
    run of it would record it; without --variant, or with a wrong one, one line naming the variants."""
    import json

    from dimr_lab.runner.plan import expand
    from dimr_lab.spec.ablation import load_ablation
    from dimr_lab.spec.schema import to_dict

    path = Path(__file__).resolve().parents[1] / "ablations" / "tdln_vs_adaln_matched.toml"
    abl = load_ablation(path, check=False)
    for profile in ("tiny", "paper"):
        (run, *_) = expand(abl, profile, only=["tdln_deep"])
        code, out, err = cli(["describe", path, "--variant", "tdln_deep", "--profile", profile, "--json"], capsys)
        assert code == 0, err
        info = json.loads(out)
        assert info["spec"] == json.loads(json.dumps(to_dict(run.spec.model)))
        assert info["branches"][0]["blocks"] == run.spec.model.branches[0].depth + 1  # even depth: in, mid, out
    code, out, err = cli(["describe", path, "--variant", "tdln_deep", "--json"], capsys)  # tiny, as `run`
    assert json.loads(out)["spec"]["image_size"] == 16
    # --set applies on top of the variant's network, as on a preset
    code, out, err = cli(["describe", path, "--variant", "tdln_deep", "--set", "branches.0.depth=4", "--json"], capsys)
    code2, out2, _ = cli(["describe", path, "--variant", "tdln", "--json"], capsys)
    assert json.loads(out)["params"] == json.loads(out2)["params"]
    one_line_exit_2(*cli(["describe", path], capsys), "give --variant NAME (one of tdln, adaln_zero,")
    one_line_exit_2(*cli(["describe", path, "--variant", "tdln_dep"], capsys), "did you mean 'tdln_deep'")
    one_line_exit_2(*cli(["describe", path, "--variant", "tdln", "--profile", "huge"], capsys),
                    "unknown profile 'huge'")
    one_line_exit_2(*cli(["describe", "dimr_tiny_3r", "--variant", "tdln"], capsys), "not one")


def test_describe_of_a_run_folder_with_overrides_is_the_network_of_its_source_spec_with_them(tmp_path, capsys):
    """`describe RUN --set model.mlp=glu` kept the MLP width the run's resolved spec holds (the plain MLP's 4d),
    where the spec the run was made from, with the same override, gives the GLU its own (2d). What resolving
    derived is derived again from the overridden settings; a width the run set itself stays."""
    import json

    from dimr_lab.rundir import RunDir
    from dimr_lab.spec.run_spec import load_run_spec
    from dimr_lab.spec.schema import to_dict

    spec = load_run_spec(None, [("model.mlp", "mlp"), ("model.branches.1.mlp_width", 72)])
    run = tmp_path / "mlp-s0-abc"
    run.mkdir()
    RunDir(run).write_spec_document(to_dict(spec), spec.identity_hash())
    source = tmp_path / "mlp.toml"
    source.write_text('[model]\npreset = "dimr_tiny_3r"\nmlp = "mlp"\nbranches = [{}, { mlp_width = 72 }, {}]\n')
    for override in ("model.mlp=glu", "model.branches.0.width=64"):
        described = []
        for model in (run, source):
            code, out, err = cli(["describe", model, "--set", override, "--json"], capsys)
            assert code == 0, err
            described.append(json.loads(out))
        assert described[0]["spec"] == described[1]["spec"] and described[0]["params"] == described[1]["params"]
    code, out, err = cli(["describe", run, "--set", "model.mlp=glu", "--json"], capsys)
    assert [b["mlp_width"] for b in json.loads(out)["spec"]["branches"]] == [192, 72, 48]


def test_a_run_spec_and_an_ablation_file_given_to_the_other_command_say_which_command_takes_them(tmp_path, capsys):
    # a newcomer's first mix-up: the error names the command the file is for, not a far-fetched key
    ablation = Path(__file__).resolve().parents[1] / "ablations" / "tdln_vs_adaln.toml"
    run_spec = tmp_path / "run.toml"
    run_spec.write_text('[model]\npreset = "dimr_tiny_3r"\n[train]\nsteps = 3\n')
    for argv, fragment in ((["train", ablation, "--out", tmp_path / "out"], "dimr-lab run"),
                           (["describe", ablation], "dimr-lab run"),
                           (["run", run_spec, "--results", tmp_path / "results"], "dimr-lab train")):
        code, o, e = cli(argv, capsys)
        one_line_exit_2(code, o, e, fragment)
        assert "did you mean" not in e, e
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.toml"]


def test_a_key_that_begins_several_keys_is_answered_with_all_of_them(tmp_path, capsys):
    # `sample.guidance` means guidance_scale as often as anything: no single guess (it was guidance_form)
    code, o, e = cli(["train", "--out", tmp_path / "run", "--set", "sample.guidance=2"], capsys)
    one_line_exit_2(code, o, e, "did you mean one of 'guidance_scale', 'guidance_form', 'guidance_schedule', "
                                "'guidance_power'?")
    code, o, e = cli(["train", "--out", tmp_path / "run", "--set", "sample.guidance_scal=2"], capsys)
    one_line_exit_2(code, o, e, "(did you mean 'guidance_scale'?)")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from dimr_lab.spec.run_spec import load_run_spec
    from dimr_lab.train.trainer import train_run

    out = tmp_path_factory.mktemp("trained") / "run"
    spec = load_run_spec(None, [("train.steps", 2), ("eval.enabled", False), ("sample.steps", 2),
                                ("sample.grid_size", 2), ("data.train_size", 64), ("train.batch_size", 8)])
    train_run(spec, out, progress=False)
    return spec, out


def test_an_empty_metrics_file_is_not_done_and_is_made_again(trained, tmp_path):
    import shutil

    from dimr_lab.runner.worker import pending_evaluations
    from dimr_lab.train.trainer import train_run

    spec, src = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    (metrics,) = run.glob("evals/*/metrics.json")
    metrics.write_bytes(b"")
    assert pending_evaluations(spec, run) == [2]  # a runner would not skip it
    train_run(spec, run, progress=False)
    assert json.loads(metrics.read_text())["step"] == 2 and pending_evaluations(spec, run) == []


def test_leftover_temporaries_are_removed_when_a_run_starts(trained, tmp_path):
    import shutil

    from dimr_lab.train.trainer import train_run

    spec, src = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    junk = [run / "checkpoints" / ".last.pt.abc123.tmp", run / ".spec.json.x.tmp"]
    for j in junk:
        j.write_bytes(b"half a file")
    train_run(spec, run, progress=False)
    assert not any(j.exists() for j in junk)


@pytest.mark.parametrize("command", ["sample", "export"])
def test_a_checkpoint_whose_step_is_no_number_is_one_line(command, trained, tmp_path, capsys):
    import shutil

    import torch

    _, src = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    for ckpt in (run / "checkpoints").glob("*.pt"):
        data = torch.load(ckpt, weights_only=True)
        data["step"] = "x"
        ckpt.unlink()  # kept checkpoints may be hard links of one another
        torch.save(data, ckpt)
    out = tmp_path / ("grid.png" if command == "sample" else "net.safetensors")
    args = ["--n", "2"] if command == "sample" else []
    one_line_exit_2(*cli([command, run, "--out", out, *args], capsys), "corrupt checkpoint (its step is 'x'")
    assert not out.exists()


@pytest.mark.parametrize("args, fragment", [
    (["--guidance", "2"], "error: --guidance: sample.guidance_scale: guidance (scale 2.0) needs the null label"),
    (["--sampler", "ddim", "--order", "3"], "--sampler/--order: sample.order: sampler 'ddim' takes orders 1"),
    (["--seed", "99999999999"], "--seed: sample.seed: must be <= "),
])
def test_sample_options_are_checked_as_eval_settings_are(args, fragment, tmp_path, capsys):
    """`sample --guidance` on a run trained without label dropout guided with the never-trained null label, an
    order the sampler ignores was sampled anyway, and a seed out of range was a traceback: eval refuses all three."""
    from dimr_lab.spec.run_spec import load_run_spec
    from dimr_lab.train.trainer import train_run

    run = tmp_path / "run"
    spec = load_run_spec(None, [("train.steps", 1), ("eval.enabled", False), ("sample.steps", 2),
                                ("sample.grid_size", 2), ("data.train_size", 64), ("train.batch_size", 8),
                                ("diffusion.label_drop", 0.0), ("sample.guidance_scale", 0.0)])
    train_run(spec, run, progress=False)
    out = tmp_path / "grid.png"
    one_line_exit_2(*cli(["sample", run, "--out", out, "--n", "2", *args], capsys), fragment)
    assert not out.exists()
    code, _, err = cli(["sample", run, "--out", out, "--n", "2", "--sampler", "ddim", "--order", "1"], capsys)
    assert code == 0 and out.exists(), err
    # another sampler without --order samples at an order it takes, not at the run's (2, which ddim does not)
    code, _, err = cli(["sample", run, "--out", out, "--n", "2", "--sampler", "ddim", "--force"], capsys)
    assert code == 0, err



def test_sample_classes_label_the_grid_in_turn_and_the_default_grid_is_unchanged(trained, tmp_path, capsys,
                                                                                 monkeypatch):
    """`sample` drew class-balanced labels only; --classes asks for given classes, in turn, each sample keeping
    the noise of its index. Without it the grid is what it was: sample i of the run's balanced labels (i mod
    K), generated from index i's noise."""
    import numpy as np
    import torch

    import dimr_lab.images
    from dimr_lab.eval.sampling import data_classes, generate, load_run_model, to_uint8

    _, run = trained
    drawn = []
    real_write_grid = dimr_lab.images.write_grid

    def write_grid(images, path, labels=None, class_names=None, **kw):
        drawn.append((images.clone(), list(labels)))
        return real_write_grid(images, path, labels, class_names, **kw)

    monkeypatch.setattr(dimr_lab.images, "write_grid", write_grid)
    n = 12

    def grid(name, *args):
        code, _, err = cli(["sample", run, "--out", tmp_path / name, "--n", str(n), *args], capsys)
        assert code == 0, err
        return drawn[-1]

    default_images, default_labels = grid("default.png")
    model, spec, _ = load_run_model(run, ema=True, device="cpu")
    k = data_classes(spec)
    assert k == 8 and default_labels == [i % k for i in range(n)]
    expected = generate(model, spec, np.arange(n), torch.arange(n) % k)
    assert torch.equal(default_images, to_uint8(expected, spec.data))
    # every class in order is the default, byte for byte
    grid("all.png", "--classes", ",".join(map(str, range(k))))
    assert (tmp_path / "all.png").read_bytes() == (tmp_path / "default.png").read_bytes()
    # numbers and names, in turn; each sample from its own index's noise with the label asked for
    images, labels = grid("asked.png", "--classes", "3, circle")
    assert labels == [3, 0] * (n // 2)
    assert torch.equal(images, to_uint8(generate(model, spec, np.arange(n), torch.tensor(labels)), spec.data))
    images, labels = grid("three.png", "--classes", "3")
    assert labels == [3] * n and torch.equal(images[3], default_images[3]) and torch.equal(images[11],
                                                                                         default_images[11])


@pytest.mark.parametrize("classes, fragment", [
    ("8", "--classes '8': '8' is out of range; this run's 8 classes: numbers 0 to 7 or names circle, square"),
    ("-1", "'-1' is out of range"),
    ("2,sqaure", "--classes '2,sqaure': 'sqaure' is not a class; this run's 8 classes: numbers 0 to 7"),
    ("1.5", "'1.5' is not a class"),
    ("3,,5", "--classes '3,,5': expected a comma-separated list of classes"),
    ("", "expected a comma-separated list of classes"),
])
def test_sample_classes_outside_the_run_are_one_line(classes, fragment, trained, tmp_path, capsys):
    _, run = trained
    out = tmp_path / "grid.png"
    one_line_exit_2(*cli(["sample", run, "--out", out, "--n", "2", "--classes", classes], capsys), fragment)
    assert not out.exists()

def test_an_evaluation_with_more_ddim_steps_than_fit_is_refused_before_its_folder(trained, tmp_path, capsys):
    import shutil

    _, src = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = sorted(p.name for p in (run / "evals").iterdir())
    args = ["--set", "sample.sampler=\"ddim\"", "--set", "sample.order=1", "--set", "sample.t_end=0.5"]
    one_line_exit_2(*cli(["eval", run, *args, "--set", "sample.steps=501"], capsys), "at most 500, got 501")
    assert sorted(p.name for p in (run / "evals").iterdir()) == before
    code, _, err = cli(["eval", run, *args, "--set", "sample.steps=500"], capsys)  # the most that fit
    assert code == 0, err


def test_status_table_and_cancel_read_odd_json_without_crashing(trained, tmp_path, capsys):
    import shutil

    spec, src = trained
    root = tmp_path / "results" / "abl"
    odd = {"local.json": {"state": "running", "pid": 10**20, "host": os.uname().nodename, "started": "soon"},
           "run.json": None}
    for i, (name, content) in enumerate([("local.json", odd["local.json"]), ("run.json", {"profile": {"x": 1}}),
                                         ("log.jsonl", None), ("slurm.json", {"jobs": [{"job_id": 12}]})]):
        run = root / f"r{i}"
        shutil.copytree(src, run)
        if name == "run.json":
            rec = json.loads((run / "run.json").read_text())
            rec.update(content)
            (run / "run.json").write_text(json.dumps(rec))
        elif name == "log.jsonl":
            with open(run / "log.jsonl", "ab") as f:
                f.write(b"\xff\xfe not utf-8 \n{\"step\": \n")
        else:
            (run / name).write_text(json.dumps(content))
        if name == "local.json":  # unfinished, so its state comes from local.json (a finished run is done)
            shutil.rmtree(run / "evals")
    for argv in (["status", root], ["status", root, "--json"], ["cancel", root], ["table", root],
                 ["logs", root / "r2"]):
        code, o, e = cli(argv, capsys)
        assert code in (0, 2) and "Traceback" not in o + e, (argv, e)
    code, o, e = cli(["status", root, "--json"], capsys)
    states = {json.loads(x)["run"]: json.loads(x) for x in o.splitlines()}
    assert states["r0"]["state"] == "failed"  # a pid that cannot exist: its process is gone
    assert states["r1"]["state"] == "failed" and "profile" in states["r1"]["detail"]
    # a run.json that is no JSON at all is a failure too, not a finished run
    shutil.copytree(src, root / "r9")
    (root / "r9" / "run.json").write_text('{"spec": 3')
    code, o, e = cli(["status", root / "r9", "--json"], capsys)
    (st,) = [json.loads(x) for x in o.splitlines()]
    assert st["state"] == "failed" and "run.json" in st["detail"], st
    code, o, e = cli(["logs", root / "r2", "-n", "0"], capsys)
    assert code == 2 and "Traceback" not in e


def test_files_follow_the_umask(tmp_path):
    from dimr_lab.atomic import atomic_write_text

    old = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o664



def _record_fsyncs(monkeypatch) -> list[str]:
    """Replace os.fsync by one that records what each call flushed (a file's or a folder's path)."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name an fd")
def test_an_atomic_write_flushes_its_folder_after_the_file(tmp_path, monkeypatch):
    """The rename that publishes a file is on disk when the write returns: the folder is fsynced after the
    file, and a folder the write creates is flushed into its parent (else a power loss can lose either)."""
    from dimr_lab.atomic import atomic_write_text

    synced = _record_fsyncs(monkeypatch)
    atomic_write_text(tmp_path / "a.json", "{}")
    assert synced[-1] == str(tmp_path), synced
    assert any(p.startswith(str(tmp_path / ".a.json.")) for p in synced[:-1]), synced  # the temporary file, first
    synced.clear()
    atomic_write_text(tmp_path / "run" / "checkpoints" / "index.json", "{}")
    assert synced.index(str(tmp_path)) < synced.index(str(tmp_path / "run")) \
        < synced.index(str(tmp_path / "run" / "checkpoints")), synced
    assert synced[-1] == str(tmp_path / "run" / "checkpoints"), synced
    synced.clear()
    atomic_write_text(tmp_path / "a.json", "{}")  # nothing created: the file and its folder only
    assert len(synced) == 2 and synced[1] == str(tmp_path), synced


def test_an_atomic_write_on_a_folder_that_refuses_fsync_still_writes(tmp_path, monkeypatch):
    from dimr_lab import atomic

    real = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(22, "Invalid argument")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic.atomic_write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}"


@pytest.mark.timeout(600)
def test_ctrl_c_checkpoints_and_says_how_to_resume(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID"):
        env.pop(k, None)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", "from dimr_lab.cli import main; main()", "train", "--out", str(run),
                             "--set", "train.steps=100000", "--set", "eval.enabled=false", "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (run / "log.jsonl").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130 and "run the same command to resume" in err and "Traceback" not in err, err
    assert (run / "checkpoints" / "last.pt").is_file()


@pytest.mark.parametrize("argv,fragment", [
    (["status", ".", "--watch", "nan"], "--watch nan: must be a finite number"),
    (["status", ".", "--watch", "inf"], "--watch inf: must be a finite number"),
    (["bench", "dimr_tiny_3r", "--guidance", "nan", "--sample-nfe", "1"], "--guidance nan: must be a finite number"),
])
def test_nan_and_inf_options_are_one_line(argv, fragment, capsys):
    one_line_exit_2(*cli(argv, capsys), fragment)


@pytest.mark.parametrize("argv,fragments", [
    (["train", "--threads", "-1"], ["'--threads'"]),
    (["train", "--bogus"], ["No such option", "--bogus"]),  # click's wording varies: "option: --bogus", "option '--bogus'"
    (["bogus"], ["No such command 'bogus'"]),
    (["table"], ["Missing argument"]),
])
def test_usage_errors_are_one_line_naming_the_help(argv, fragments, capsys):
    code, out, err = cli(argv, capsys)
    for fragment in fragments:
        one_line_exit_2(code, out, err, fragment)
    assert f"'dimr-lab {argv[0]} --help'" in err or "'dimr-lab --help'" in err


def test_logs_follow_goes_on_after_a_resumed_run_rewrites_its_log(tmp_path, capsys):
    """A training session rewrites log.jsonl up to its checkpoint (a new file), then appends: following it
    printed nothing more once it was replaced."""
    from dimr_lab.atomic import atomic_write_text
    from dimr_lab.cli.run_cmds import _follow

    log = tmp_path / "log.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 7)]
    log.write_text("".join(rows[:4]))

    def after(n):  # what happens between the follower's polls
        def act(_seconds):
            act.calls += 1
            if act.calls == 1:
                with open(log, "a") as f:
                    f.write(rows[4])  # step 5; killed, and resumed from its checkpoint at step 3:
            elif act.calls == 2:  # rows to 3 kept, in a new file, and step 4 trained again
                atomic_write_text(log, "".join(rows[:3]) + json.dumps({"step": 4, "loss": 0.5}) + "\n")
            elif act.calls == 3:
                with open(log, "a") as f:
                    f.write(rows[4] + rows[5])
            elif act.calls == 4:
                log.write_text("")  # cut to nothing in place, then written anew
                log.write_text(rows[0])
            elif act.calls >= n:
                raise KeyboardInterrupt
        act.calls = 0
        return act

    with pytest.raises(KeyboardInterrupt):
        _follow(log, sleep=after(6))
    printed = capsys.readouterr().out
    assert printed == rows[4] + json.dumps({"step": 4, "loss": 0.5}) + "\n" + rows[4] + rows[5] + rows[0], printed



def test_logs_follow_moves_to_the_log_of_a_job_submitted_again(tmp_path, capsys):
    """A run submitted again (a new SLURM job) writes its own files under .submitit/<job id>/: following
    stayed on the old job's file and printed nothing more. It now moves to the new job's log, and to a local
    rerun's output.log (from where that file stood when following began), each after a '==> PATH <==' line."""
    import threading

    from dimr_lab.cli.run_cmds import _follow
    from dimr_lab.rundir import RunDir, write_json
    from dimr_lab.runner.slurm_logs import run_log_file, run_log_files

    run = tmp_path / "abl" / "r0"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    (run / "output.log").write_text("an earlier local run\n")
    os.utime(run / "output.log", (time.time() - 600, time.time() - 600))
    submitit = tmp_path / "abl" / ".submitit"

    def job(job_id):  # the record `run --executor slurm` keeps, with submitit's file names
        folder = submitit / job_id
        return {"job_id": job_id, "folder": str(folder), "stdout": str(folder / f"{job_id}_0_log.out"),
                "stderr": str(folder / f"{job_id}_0_log.err")}

    first, second = job("100_0"), job("101_0")
    Path(first["folder"]).mkdir(parents=True)
    Path(first["stderr"]).write_text("old 1\n")
    write_json(run / "slurm.json", {"jobs": [first]})
    start = run_log_file(RunDir(run))
    assert start == Path(first["stderr"])
    offsets = {p: p.stat().st_size for p in run_log_files(RunDir(run))}

    def append(path, text):
        time.sleep(0.15)  # a few polls between the steps, and a later modification time
        with open(path, "a") as f:
            f.write(text)

    def writer():
        append(first["stderr"], "old 2\n")
        write_json(run / "slurm.json", {"jobs": [first, second]})  # submitted: no file of its own yet
        time.sleep(0.15)
        Path(second["folder"]).mkdir()
        append(second["stderr"], "new 1\n")
        append(second["stderr"], "new 2\n")
        append(run / "output.log", "local 1\n")

    thread = threading.Thread(target=writer)
    polls_after = []

    def sleep(_seconds):
        time.sleep(0.02)
        if not thread.is_alive():
            polls_after.append(1)
            if len(polls_after) > 10:
                raise KeyboardInterrupt

    thread.start()
    with pytest.raises(KeyboardInterrupt):
        _follow(start, sleep, locate=lambda: run_log_file(RunDir(run)), offsets=offsets)
    thread.join()
    printed = capsys.readouterr().out
    assert printed == (f"old 2\n==> {second['stderr']} <==\nnew 1\nnew 2\n"
                       f"==> {run / 'output.log'} <==\nlocal 1\n"), printed

def test_logs_follow_prints_every_stream_of_a_slurm_job(tmp_path):
    """submitit writes a job's stdout and stderr to two files: `logs --follow` followed the newer one only, and
    what the job printed to the other stream never showed. It now prints what is appended to both, interleaved
    as they grow (a '==> PATH <==' line where the stream changes, as `tail -f` does with several files), and
    still moves to the streams of a job submitted again. Run as the command, against files appended to."""
    from dimr_lab.rundir import write_json

    run = tmp_path / "abl" / "r0"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    submitit = tmp_path / "abl" / ".submitit"

    def job(job_id):
        folder = submitit / job_id
        folder.mkdir(parents=True)
        return {"job_id": job_id, "folder": str(folder), "stdout": str(folder / f"{job_id}_0_log.out"),
                "stderr": str(folder / f"{job_id}_0_log.err")}

    first = job("100_0")
    Path(first["stdout"]).write_text("out 0\n")
    os.utime(first["stdout"], (time.time() - 60, time.time() - 60))
    Path(first["stderr"]).write_text("err 0\n")  # the newer: its tail is printed first
    write_json(run / "slurm.json", {"jobs": [first]})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "dimr_lab", "logs", str(run), "--follow"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "err 0\n"

        def append(path, text):
            with open(path, "a") as f:
                f.write(text)
            time.sleep(1.2)  # more than a poll: the order of the appends is the order printed

        time.sleep(1.0)
        append(first["stdout"], "out 1\n")
        append(first["stderr"], "err 1\n")
        append(first["stdout"], "out 2\n")
        second = job("101_0")
        write_json(run / "slurm.json", {"jobs": [first, second]})
        append(second["stdout"], "new out\n")
        append(second["stderr"], "new err\n")
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == (f"==> {first['stdout']} <==\nout 1\n==> {first['stderr']} <==\nerr 1\n"
                   f"==> {first['stdout']} <==\nout 2\n==> {second['stdout']} <==\nnew out\n"
                   f"==> {second['stderr']} <==\nnew err\n"), out


def test_logs_follow_does_not_split_a_line_of_one_stream_with_another(tmp_path, capsys):
    """Two streams followed together: a line one of them has begun is printed whole, after the other's lines
    that came meanwhile, and a line left unended (a progress bar's '\\r') still shows after a quiet poll."""
    from dimr_lab.cli.run_cmds import _follow

    out, err = tmp_path / "job.out", tmp_path / "job.err"
    out.write_text("")
    err.write_text("")
    steps = [  # what is appended between two polls
        [(out, "epoch 1 [")], [(err, "warning\n")], [(out, "done]\n")], [(out, "50%\r")], [(out, "60%")], [], [],
        [(err, "next\n")], [],
    ]

    def sleep(_seconds):
        sleep.calls += 1
        if sleep.calls > len(steps):
            raise KeyboardInterrupt
        for path, text in steps[sleep.calls - 1]:
            with open(path, "a") as f:
                f.write(text)
    sleep.calls = 0

    with pytest.raises(KeyboardInterrupt):
        _follow(err, sleep, streams=[out, err])
    assert capsys.readouterr().out == (f"warning\n==> {out} <==\nepoch 1 [done]\n50%\r60%\n==> {err} <==\nnext\n")



def test_logs_follow_keeps_a_character_cut_by_a_quiet_poll_and_survives_a_deleted_stream(tmp_path, capsys):
    """A line printed in pieces (its stream quiet for a poll, as a block-buffered writer leaves it) cut inside a
    UTF-8 character printed two replacement characters for it: the character's bytes now wait for the rest.
    Undecodable bytes are replaced, CRLF and NUL pass as they are, a stream deleted while followed is waited
    for and followed from its start when it comes back, and a very long line comes whole."""
    from dimr_lab.cli.run_cmds import _follow

    out, err = tmp_path / "job.out", tmp_path / "job.err"
    out.write_bytes(b"")
    err.write_bytes(b"")
    cafe = "caf\u00e9 half \u00e9 rest\n".encode()
    cut = cafe.index("\u00e9 rest".encode()) + 1  # inside the second \u00e9
    long = b"L" * 200_000 + b"\n"

    def append(path, data):
        return lambda: path.open("ab").write(data)

    steps = [append(out, b"one\r\ntwo\r\n"), append(err, b"bin \xff\x00 end\n"), append(err, cafe[:cut]), lambda: None,
             append(err, cafe[cut:]), lambda: err.unlink(), append(out, b"after\n"), append(err, b"back\n"),
             append(out, long)]

    def sleep(_seconds):
        sleep.calls += 1
        if sleep.calls > len(steps) + 1:
            raise KeyboardInterrupt
        if sleep.calls <= len(steps):
            steps[sleep.calls - 1]()
    sleep.calls = 0

    with pytest.raises(KeyboardInterrupt):
        _follow(out, sleep, streams=[out, err], offsets={out: 0, err: 0})
    assert capsys.readouterr().out == (f"one\r\ntwo\r\n==> {err} <==\nbin \ufffd\x00 end\ncaf\u00e9 half \u00e9 rest\n"
                                       f"==> {out} <==\nafter\n==> {err} <==\nback\n==> {out} <==\n"
                                       + long.decode())


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="the tracking extra is not installed")
def test_a_wandb_run_that_cannot_start_is_one_line(tmp_path, capsys, monkeypatch):
    """Online without a login or a connection: wandb.init raised its own error, a traceback with status 1."""
    import wandb

    def refuse(**_kw):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", refuse)
    out = tmp_path / "run"
    code, o, e = cli(["train", "--out", out, *TINY, "--set", "track.wandb=true",
                      "--set", "track.wandb_mode=\"online\""], capsys)
    one_line_exit_2(code, o, e, "track.wandb_mode: wandb could not start the run in mode 'online' (No API key")
    assert not out.exists()


# every command that writes a file or a folder where it is told: under an existing *file* it says so in one line
# (which file is in the way), before any work, and writes nothing
UNDER_A_FILE = {
    "export": ["export", "{run}", "--out", "{f}/m.safetensors"],
    "export-deeper": ["export", "{run}", "--out", "{f}/a/b/m.safetensors"],
    "sample": ["sample", "{run}", "--out", "{f}/grid.png"],
    "distortion": ["distortion", "{run}", "--out", "{f}/grid.png"],
    "table-out": ["table", "{run}", "--out", "{f}/table.md"],
    "table-plot": ["table", "{run}", "--plot", "{f}/bars.png"],
    "table-curves": ["table", "{run}", "--curves", "{f}/curves.png"],
    "convert-official": ["convert-official", "{tmp}/released.pth", "{f}/converted.pt"],
    "train": ["train", "--out", "{f}/run", *TINY],
    "run": ["run", "{tmp}/abl.toml", "--results", "{f}/results"],
    "prepare-latents": ["prepare-latents", "{tmp}/imgs", "{f}/latents", "--vae", "{tmp}/vae"],
}


@pytest.mark.parametrize("name", list(UNDER_A_FILE))
def test_an_output_path_under_a_file_is_one_line_naming_the_file(tmp_path, capsys, name):
    from test_data import write_folder

    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    write_folder(tmp_path / "imgs")
    (tmp_path / "abl.toml").write_text('name = "abl"\n[[variants]]\nname = "base"\n')
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = [a.format(run=tmp_path / "run", f=notes, tmp=tmp_path) for a in UNDER_A_FILE[name]]
    one_line_exit_2(*cli(argv, capsys), f"{notes} is a file, not a folder")
    assert notes.read_text() == "mine\n"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "nothing written"


def test_a_busy_run_folder_names_the_holder_that_writes_its_name_just_after_taking_the_lock(tmp_path):
    """Two processes racing for one folder: the loser could read the lock file between the winner's flock and
    its write of its name, and said 'in use by another process'. It waits a moment for the name."""
    import fcntl
    import threading

    from dimr_lab.rundir import LOCK, RunBusy, run_lock

    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT, 0o666)  # another open file: flock conflicts in one process
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        timer = threading.Timer(0.15, lambda: os.write(fd, b"node7 4242 train\n"))
        timer.start()
        with pytest.raises(RunBusy, match="in use by pid 4242 on host node7"):
            with run_lock(run):
                pass
        timer.join()
    finally:
        os.close(fd)
