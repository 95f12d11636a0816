"""Released DiMR weights: the converter (both ways), equivalence with the released code, the CLI; bench.

The equivalence tests import the released implementation from a checkout named by $DIMR_OFFICIAL_SRC
(README, Testing); without it they are skipped with that reason.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dimr_lab
from dimr_lab.errors import UserError
from dimr_lab.nn.network import build_model
from dimr_lab.nn.official import (convert_official_state_dict, official_config,
                                  to_official_state_dict)
from dimr_lab.spec.model_spec import resolve_model
from dimr_lab.spec.schema import to_dict



def _t(width, depth, heads, patch, **kw):
    return {"block": "transformer", "width": width, "depth": depth, "heads": heads, "patch": patch, **kw}


def _c(width, depth, patch, kernel, **kw):
    return {"block": "convnext", "width": width, "depth": depth, "patch": patch, "kernel": kernel, **kw}


SPECS = {
    "2r_tdrms_k3": {"in_channels": 4, "image_size": 8, "num_classes": 10, "norm": "tdrmsnorm",
                    "branches": [_t(32, 3, 4, 2), _c(16, 2, 1, 3, out_kernel=5)]},
    "3r_tdln_k7_k5": {"in_channels": 3, "image_size": 16, "num_classes": 7, "norm": "tdln",
                      "branches": [_t(24, 1, 2, 4, mlp_width=40), _c(16, 3, 2, 7), _c(8, 2, 1, 5)]},
    "2r_rms_2heads": {"in_channels": 3, "image_size": 8, "num_classes": 5, "norm": "rmsnorm",
                      "branches": [_t(16, 2, 2, 2), _c(8, 1, 1, 7, out_kernel=1)]},
}


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight random, time-dependent p0/p1/w/b included (so time-dependence is exercised)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if name.endswith((".w", ".b", "nodecay_weight", "nodecay_bias")) else 0.2
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if name.endswith(("p0", "param0")) else 0))


def inputs(spec, batch=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size, generator=gen)
    t = torch.tensor([0.05, 0.5, 0.93][:batch])  # distinct t per sample
    y = torch.tensor([0, spec.num_classes, 2][:batch])  # the null label included
    return x, t, y


def comparable(spec) -> dict:
    d = to_dict(spec)
    for key in ("name", "attention_fp32"):
        d.pop(key)
    for b in d["branches"]:
        b["depth"] = b["depth"] // 2 * 2 + 1  # the released code stores the built block count
        if b["block"] != "convnext":
            b.pop("kernel")
    return d


# --------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", list(SPECS))
def test_round_trip_through_the_released_layout(name):
    torch.manual_seed(0)
    model = build_model(SPECS[name]).eval()
    randomise(model)
    official = to_official_state_dict(model)
    assert all(k.startswith("stages.") for k in official)
    heads = model.spec.branches[0].heads
    spec, state = convert_official_state_dict(official, heads=heads)
    assert comparable(spec) == comparable(model.spec)
    ours = model.state_dict()
    assert set(state) == set(ours)
    assert all(torch.equal(state[k], ours[k]) for k in ours)
    back = build_model(spec).eval()
    back.load_state_dict(state)
    x, t, y = inputs(spec)
    with torch.no_grad():
        for a, b in zip(model(x, t, y), back(x, t, y)):
            assert torch.equal(a, b)


def test_wrapped_and_prefixed_state_dicts_convert_the_same():
    model = build_model(SPECS["2r_tdrms_k3"])
    official = to_official_state_dict(model)
    spec, state = convert_official_state_dict(official, heads=4)
    for wrapped in ({"module." + k: v for k, v in official.items()},
                    {"state_dict": {"module." + k: v for k, v in official.items()}, "step": 3},
                    {"nnet_ema": official}):
        spec2, state2 = convert_official_state_dict(wrapped, heads=4)
        assert to_dict(spec2) == to_dict(spec) and all(torch.equal(state2[k], state[k]) for k in state)
    # a file holding the raw and the EMA weights converts the EMA ones, whichever key comes first
    raw = {k: v * 2 for k, v in official.items()}
    for both in ({"nnet": raw, "nnet_ema": official}, {"model": raw, "ema": official, "step": 3}):
        _, state2 = convert_official_state_dict(both, heads=4)
        assert all(torch.equal(state2[k], state[k]) for k in state)


def test_converter_refuses_what_it_cannot_place():
    model = build_model(SPECS["2r_tdrms_k3"])
    official = to_official_state_dict(model)
    with pytest.raises(UserError, match=r"cannot place key 'stages\.1\.blocks\.0\.block1\.extra'"):
        convert_official_state_dict({**official, "stages.1.blocks.0.block1.extra": torch.zeros(2)}, heads=4)
    with pytest.raises(UserError, match=r"cannot place key 'pos_emb\.freqs'"):
        convert_official_state_dict({**official, "pos_emb.freqs": torch.zeros(2)}, heads=4)
    missing = dict(official)
    del missing["stages.0.skip_denses.0.bias"]
    with pytest.raises(UserError, match=r"missing 'stages\.0\.skip_denses\.0\.bias'"):
        convert_official_state_dict(missing, heads=4)
    bad = {**official, "stages.0.blocks.1.block2.w1.weight": torch.zeros(3, 3)}
    with pytest.raises(UserError, match=r"stages\.0\.blocks\.1\.block2\.w1\.weight.*shape"):
        convert_official_state_dict(bad, heads=4)
    with pytest.raises(UserError, match="not divisible by --heads 5"):
        convert_official_state_dict(official, heads=5)
    # empty tables of a foreign file were a ZeroDivisionError (the input size divided by 0 x patch, or res x 0)
    rows = "stages.0.input_layer.3.position_embeddings.weight"
    with pytest.raises(UserError, match=r"position_embeddings\.weight has 0 rows, not a square grid"):
        convert_official_state_dict({**official, rows: official[rows][:0]}, heads=4)
    conv = "stages.1.input_layer.1.weight"
    with pytest.raises(UserError, match=r"stages\.1\.input_layer\.1\.weight is not a square kernel"):
        convert_official_state_dict({**official, conv: official[conv][:, :, :0, :0]}, heads=4)
    with pytest.raises(UserError, match="not a state dict"):
        convert_official_state_dict({"epoch": 3}, heads=4)


def test_released_config_matches_the_released_xl_2r_file():
    cfg = official_config(resolve_model("dimr_xl_2r"))
    assert cfg["num_classes"] == 1001 and cfg["norm_type"] == "TDRMSN" and cfg["channels"] == 4
    t, c = cfg["stage_configs"]
    assert (t["dim"], t["hidden_dim"], t["num_blocks"], t["max_height"], t["input_feature_ratio"]) == (960, 1920, 39, 16, 2)
    assert (c["dim"], c["hidden_dim"], c["num_blocks"], c["max_height"], c["kernel_size"]) == (480, 960, 20, 32, 7)


# --------------------------------------------------------------------------- the released implementation


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    src = os.environ.get("DIMR_OFFICIAL_SRC")
    if not src:
        pytest.skip("the released DiMR code is not available: set DIMR_OFFICIAL_SRC to a checkout of "
                    "github.com/qihao067/DiMR (README, Testing)")
    root = Path(src)
    if not (root / "libs" / "core" / "blocks.py").is_file():
        pytest.skip(f"{root} is not a DiMR checkout (no libs/core/blocks.py)")
    sys.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from libs.core import blocks
    except ImportError as err:
        pytest.skip(f"cannot import the released code: {err}")
    finally:
        sys.path.remove(str(root))
    return blocks


class _Args:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def _released_model(blocks, spec):
    cfg = official_config(resolve_model(spec))
    cfg["stage_configs"] = [_Args(**s) for s in cfg["stage_configs"]]
    return blocks.MRModel(_Args(**cfg))


def _rel(a, b):
    return ((a - b).norm() / a.norm()).item()


@pytest.mark.parametrize("name", list(SPECS))
def test_outputs_equal_the_released_implementation(released, name):
    torch.manual_seed(0)
    theirs = _released_model(released, SPECS[name])
    randomise(theirs, seed=3)
    heads = SPECS[name]["branches"][0]["heads"]
    spec, state = convert_official_state_dict(theirs.state_dict(), heads=heads)
    ours = build_model(spec)
    ours.load_state_dict(state)
    x, t, y = inputs(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tt in (t, torch.full_like(t, 0.3)):  # per-sample t, then one t for the batch
            a = theirs(x, log_snr=8 * tt - 4, y=y)
            b = ours(x, tt, y)
            assert len(a) == len(b) == len(spec.branches)
            for u, v in zip(a, b):
                assert u.shape == v.shape and _rel(u, v) < 1e-4
        # gradients too (the released blocks recompute in backward; same values)
        sum(o.square().mean() for o in a).backward()
        sum(o.square().mean() for o in b).backward()
    back = to_official_state_dict(ours)
    their_params = dict(theirs.named_parameters())
    our_params = dict(ours.named_parameters())
    from dimr_lab.nn.official import key_pairs

    for off, mine in key_pairs(spec):
        assert torch.equal(back[off], theirs.state_dict()[off])
        ga, gb = their_params[off].grad, our_params[mine].grad
        assert (ga - gb).norm() <= 1e-4 * ga.norm() + 1e-7, off


def test_autocast_attention_dtype_matches_the_released_implementation(released):
    """Under bf16 autocast the released attention's .float() is undone by autocast (SDPA is on its
    lower-precision list), so the converted network attends in bf16 too: same outputs as the released
    model under autocast, far closer than float32 attention would be."""
    name = next(iter(SPECS))
    torch.manual_seed(0)
    theirs = _released_model(released, SPECS[name])
    randomise(theirs, seed=3)
    spec, state = convert_official_state_dict(theirs.state_dict(), heads=SPECS[name]["branches"][0]["heads"])
    assert spec.attention_fp32 is False
    ours = build_model(spec)
    ours.load_state_dict(state)
    seen = []
    for module in ours.modules():
        if hasattr(module, "backend") and hasattr(module, "fp32"):
            inner = module.backend
            module.backend = lambda q, k, v, inner=inner: seen.append(q.dtype) or inner(q, k, v)
    x, t, y = inputs(spec)
    with warnings.catch_warnings(), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("ignore")
        a = theirs(x, log_snr=8 * t - 4, y=y)
        b = ours(x, t, y)
    assert seen and set(seen) == {torch.bfloat16}
    for u, v in zip(a, b):
        assert _rel(u.float(), v.float()) < 2e-2


# ------------------------------------------------------------------------------------------------- CLI


def _cli(argv, capsys):
    from dimr_lab.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error:") and "\n" not in err and "Traceback" not in err
    return err


def test_convert_official_cli_writes_a_loadable_checkpoint(tmp_path, capsys):
    import dimr_lab
    from dimr_lab.cli import main

    model = build_model(SPECS["3r_tdln_k7_k5"]).eval()
    randomise(model)
    src, dst = tmp_path / "nnet_ema.pth", tmp_path / "out" / "dimr.pt"
    torch.save({"module." + k: v for k, v in to_official_state_dict(model).items()}, src)
    main(["convert-official", str(src), str(dst), "--heads", "2"])
    out = capsys.readouterr().out
    assert "transformer" in out and "convnext" in out and "parameters" in out
    loaded = dimr_lab.load_model(dst)
    x, t, y = inputs(loaded.spec)
    with torch.no_grad():
        for a, b in zip(model(x, t, y), loaded(x, t, y)):
            assert torch.equal(a, b)


def test_convert_official_cli_errors(tmp_path, capsys):
    assert "no such released checkpoint" in _cli(["convert-official", tmp_path / "missing.pth", tmp_path / "o.pt"],
                                                 capsys)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    assert "corrupt or unreadable released checkpoint" in _cli(["convert-official", corrupt, tmp_path / "o.pt"],
                                                                capsys)
    model = build_model(SPECS["2r_tdrms_k3"])
    odd = tmp_path / "odd.pth"
    torch.save({**to_official_state_dict(model), "stages.0.text_conditioning.weight": torch.zeros(2)}, odd)
    err = _cli(["convert-official", odd, tmp_path / "o.pt", "--heads", "4"], capsys)
    assert "stages.0.text_conditioning.weight" in err
    assert not (tmp_path / "o.pt").exists()
    # an existing destination is refused unless --force; a directory is refused outright
    good = tmp_path / "good.pth"
    torch.save(to_official_state_dict(model), good)
    (tmp_path / "o.pt").write_bytes(b"keep me")
    assert "exists; refusing to overwrite" in _cli(["convert-official", good, tmp_path / "o.pt", "--heads", "4"],
                                                    capsys)
    assert (tmp_path / "o.pt").read_bytes() == b"keep me"
    from dimr_lab.cli import main

    main(["convert-official", str(good), str(tmp_path / "o.pt"), "--heads", "4", "--force"])
    assert dimr_lab.load_model(tmp_path / "o.pt").spec.branches[0].heads == 4
    assert "is a directory" in _cli(["convert-official", good, tmp_path, "--heads", "4"], capsys)
    # NaN weights (a diverged or damaged file) are refused, naming the tensor
    state = to_official_state_dict(model)
    name = next(iter(state))
    state[name] = torch.full_like(state[name], float("nan"))
    torch.save({"nnet_ema": state}, tmp_path / "nan.pth")
    err = _cli(["convert-official", tmp_path / "nan.pth", tmp_path / "nan.pt", "--heads", "4"], capsys)
    assert f"tensor {name!r} holds NaN" in err and not (tmp_path / "nan.pt").exists()
    # a dimr-lab checkpoint (here the one converted above) was "cannot place key ..." about its wrapper
    err = _cli(["convert-official", tmp_path / "o.pt", tmp_path / "again.pt"], capsys)
    assert "o.pt: a dimr-lab checkpoint (format 'dimr-lab/" in err and "nothing to convert" in err
    assert not (tmp_path / "again.pt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # the summary says which entry of a wrapped file was converted
    torch.save({"nnet": to_official_state_dict(model), "nnet_ema": to_official_state_dict(model)}, tmp_path / "b.pth")
    main(["convert-official", str(tmp_path / "b.pth"), str(tmp_path / "b.pt"), "--heads", "4"])
    assert "'nnet_ema' entry, its EMA weights" in " ".join(capsys.readouterr().out.split())


def test_timm_loads_a_converted_preset_under_its_name(tmp_path):
    """convert-official names a preset's network "<preset name> (released weights)"; timm's pretrained=True
    compared names exactly and refused the converted file under the very preset it is."""
    import timm

    import dimr_lab.nn.timm_models  # noqa: F401
    from dimr_lab.nn.official import convert_official

    model = build_model("dimr_tiny_2r").eval()
    randomise(model)
    torch.save(to_official_state_dict(model), tmp_path / "nnet_ema.pth")
    convert_official(tmp_path / "nnet_ema.pth", tmp_path / "tiny.pt", heads=model.spec.branches[0].heads)
    overlay = {"file": str(tmp_path / "tiny.pt")}
    loaded = timm.create_model("dimr_tiny_2r", pretrained=True, pretrained_cfg_overlay=overlay)
    assert loaded.spec.name.endswith("(released weights)")
    x, t, y = inputs(loaded.spec)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x, t, y), loaded(x, t, y)))
    with pytest.raises(UserError, match=r"not DiMR-tiny/3R \(dimr_tiny_3r\); load it with "
                                        r"timm\.create_model\('dimr_tiny_2r'"):
        timm.create_model("dimr_tiny_3r", pretrained=True, pretrained_cfg_overlay=overlay)


# ----------------------------------------------------------------------------------------------- bench


def test_bench_json_for_a_tiny_preset(capsys):
    from dimr_lab.cli import main

    main(["bench", "dimr_tiny_2r", "--batch", "1", "--steps", "1", "--warmup", "0", "--json",
          "--set", "branches.0.depth=1", "--set", "branches.1.depth=1", "--set", "attention_fp32=true",
          "--sample-nfe", "1", "--sample-batch", "3"])
    info = json.loads(capsys.readouterr().out)
    # the sampler at its own batch, with and without guidance (guided calls carry both halves: 2 x 3 images)
    assert [(r["batch"], r["guidance"]) for r in info["sampling"]] == [(3, 0.0), (3, 1.5)]
    assert info["sampling"][1]["forward_images_per_s"] == pytest.approx(2 * info["sampling"][1]["images_per_s"])
    for key in ("train_images_per_s", "forward_images_per_s", "peak_memory_mib", "train_step_s", "forward_s",
                "train_tflops", "params", "gmacs_per_image", "memory_measure"):
        assert key in info, key
    assert info["train_images_per_s"] > 0 and info["forward_images_per_s"] > 0 and "mfu" not in info
    assert info["device"] == "cpu" and info["dtype"] == "float32" and info["peak_tflops"] is None


@pytest.mark.timeout(300)
def test_bench_compiles_a_second_network_in_the_same_process():
    """Every network's blocks share their forward's code object, and torch.compile's recompile limit counts
    graphs per code object: a second compiled benchmark in one process (the GPU suite takes several) must
    start from a fresh state, not inherit the first one's graphs and run eager. The limit is lowered here so
    that two tiny networks reach it."""
    from dimr_lab.bench import bench

    first = {"preset": "dimr_tiny_2r", "branches": [{"depth": 1}, {"depth": 1}]}
    second = {"preset": "dimr_tiny_2r", "branches": [{"depth": 1, "width": 48, "heads": 2}, {"depth": 1, "width": 24}]}
    limit = torch._dynamo.config.recompile_limit
    # torch's own patch (monkeypatch's undo would leave the config module's alias broken for later tests)
    with torch._dynamo.config.patch(recompile_limit=2):
        for spec in (first, second):
            r = bench(spec, batch=2, steps=1, warmup=0, compile=True)
            assert r["compiled_graphs"] >= 2 and r["compile_fallbacks"] == 0, r
    assert torch._dynamo.config.recompile_limit == limit


def test_bench_refuses_bad_flags(capsys):
    assert "--dtype" in _cli(["bench", "dimr_tiny_2r", "--dtype", "float64"], capsys)
    assert "dimr_tiny_2r" in _cli(["bench", "dimr_tiny_2q"], capsys)
