"""Networks: every registered component and every preset at tiny size; TD-LN; spec validation."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import re
import subprocess
import sys

import pytest
import torch

from dimr_lab.errors import SpecError, UserError
from dimr_lab.nn.network import build_model, optimizer_param_groups
from dimr_lab.nn.time_dependent import TimeDependentParameter, evaluate_all
from dimr_lab.registry import KINDS
from dimr_lab.spec.model_spec import resolve_model
from dimr_lab.spec.presets import PAPER_SIZES, PRESETS
from dimr_lab.spec.schema import to_dict

TINY_2R = {"in_channels": 3, "image_size": 16, "num_classes": 5,
           "branches": [{"block": "transformer", "width": 32, "depth": 2, "heads": 2, "patch": 2},
                        {"block": "convnext", "width": 16, "depth": 2, "patch": 1, "kernel": 3}]}


def _variant(kind: str, name: str) -> dict:
    """A tiny 2-branch spec that uses component `name` of `kind` (with what it needs)."""
    spec = copy.deepcopy(TINY_2R)
    # what a component needs comes from its registered facts, so a new name is covered without a case here
    if kind == "norm":
        spec["norm"] = name
        condition = KINDS["norm"].meta(name, "condition")
        if condition == "vector":  # reads the adaLN condition vector
            spec.update(conditioning="adaln", outer_norm="adaln")
        elif condition == "none":  # time has to enter as a token
            spec.update(conditioning="token", outer_norm=name)
    elif kind == "conditioning":
        spec["conditioning"] = name
        if KINDS["conditioning"].meta(name, "vector"):
            spec.update(norm="adaln_zero", outer_norm="adaln")
        if name == "token":  # time only through its token: plain norms
            spec.update(norm="layernorm", outer_norm="layernorm")
    elif kind == "block":
        for b in spec["branches"]:
            b["block"] = name
        if not KINDS["block"].meta(name, "uses_attention"):  # no tokens to carry the label: adaLN carries it
            spec.update(conditioning="adaln", norm="adaln_zero", outer_norm="adaln")
    elif kind == "head":
        spec["head"] = name
    else:
        spec[kind] = name
    return spec


def _run(model: torch.nn.Module, batch: int = 3) -> list[torch.Tensor]:
    s = model.spec
    x = torch.randn(batch, s.in_channels, s.image_size, s.image_size)
    t = torch.rand(batch)
    y = torch.randint(0, s.num_classes + 1, (batch,))
    outs = model(x, t, y)
    assert len(outs) == len(s.branches)
    for out, size in zip(outs, s.output_sizes()):
        assert out.shape == (batch, s.out_channels, size, size)
        assert torch.isfinite(out).all()
    return outs


COMPONENTS = [(kind, name) for kind, reg in KINDS.items() if reg.group == "model" for name in reg.names()]


@pytest.mark.parametrize("kind,name", COMPONENTS, ids=[f"{k}-{n}" for k, n in COMPONENTS])
def test_every_component_builds_runs_and_trains(kind, name):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="xformers") if name == "xformers" else contextlib.nullcontext():
        model = build_model(_variant(kind, name))
        _wake(model)
        outs = _run(model)
        sum(o.square().mean() for o in outs).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(bool(g.abs().sum() > 0) for g in grads)  # every parameter is wired into the output
    # the resolved spec round-trips through JSON into the same network
    spec2 = resolve_model(json.loads(json.dumps(to_dict(model.spec))))
    assert to_dict(spec2) == to_dict(model.spec)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in build_model(spec2).state_dict().items()} == shapes


def _wake(model):
    """Move parameters off their symmetric init (TD p0 = p1, zero adaLN gates) so every one gets gradient."""
    _randomise_td(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.normal_(0, 0.02)


def _shrink(preset: str) -> dict:
    """The preset's structure at tiny width and depth."""
    spec = copy.deepcopy(PRESETS[preset])
    for i, b in enumerate(spec["branches"]):
        b.update(width=32 // (2 ** i) * 2, depth=2, mlp_width=0)
        if b["block"] == "transformer":
            b["heads"] = 2
    spec["num_classes"] = 7
    return spec


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_at_tiny_width(preset):
    torch.manual_seed(0)
    model = build_model(_shrink(preset))
    outs = _run(model, batch=2)
    outs[-1].mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("preset", sorted(PAPER_SIZES))
def test_preset_sizes_match_the_paper(preset):
    from dimr_lab.nn.describe import count

    params, gmacs, tol = PAPER_SIZES[preset]
    info = count(preset)
    assert info["params"] == pytest.approx(params, rel=tol)
    if gmacs is not None:
        assert info["gmacs"] == pytest.approx(gmacs, rel=tol)


def test_cpu_flop_count_includes_attention():
    """On the CPU the flash-attention kernel has no formula of its own; ours must count it like meta does."""
    from dimr_lab.nn.describe import count

    spec = _shrink("dimr_xl_2r")
    assert count(spec, device="cpu")["gmacs"] == pytest.approx(count(spec, device="meta")["gmacs"], rel=1e-9)


def test_td_model_is_time_independent_at_init_and_not_after_training_params_move():
    torch.manual_seed(0)
    model = build_model(TINY_2R).eval()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    a, b = model(x, torch.tensor([0.1, 0.1]), y), model(x, torch.tensor([0.9, 0.9]), y)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TimeDependentParameter):
                m.p0.add_(torch.randn_like(m.p0) * 0.1)
    a, b = model(x, torch.tensor([0.1, 0.1]), y), model(x, torch.tensor([0.9, 0.9]), y)
    assert not torch.allclose(a[-1], b[-1])


def _randomise_td(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TimeDependentParameter):
                for p in (m.p0, m.p1, m.w, m.b):
                    p.copy_(torch.randn_like(p))


def test_tdln_follows_the_paper_formula():
    from dimr_lab.nn.norms import TDLayerNorm
    from dimr_lab.nn.time_dependent import Cond, collect, time_to_tau

    torch.manual_seed(0)
    norm = TDLayerNorm(8)
    _randomise_td(norm)
    params = collect(norm)
    x, t = torch.randn(3, 5, 8), torch.tensor([0.0, 0.37, 1.0])
    tau = time_to_tau(t)
    cond = Cond(t=t, tau=tau, y=None, td=evaluate_all(params, tau))
    out, gate = norm(x, cond)
    assert gate is None
    # paper: s = sigmoid(w' t + b), gamma = s p1 + (1 - s) p2, with w' = 1 + w and tau = 2t - 1 (released)
    g, b = norm.weight, norm.bias
    s_g = torch.sigmoid((1 + g.w) * (2 * t - 1)[:, None] + g.b)
    s_b = torch.sigmoid((1 + b.w) * (2 * t - 1)[:, None] + b.b)
    gamma = s_g * g.p0 + (1 - s_g) * g.p1
    beta = s_b * b.p0 + (1 - s_b) * b.p1
    ref = torch.nn.functional.layer_norm(x, (8,), eps=1e-5) * gamma[:, None] + beta[:, None]
    torch.testing.assert_close(out, ref)


# ---- norms and conditioning against hand-written references ----


def _plain_cond(B, vector=None):
    from dimr_lab.nn.time_dependent import Cond

    t = torch.rand(B)
    return Cond(t=t, tau=2 * t - 1, y=None, td=[], vector=vector)


def _ln_ref(x, eps):
    """(x - mean) / sqrt(biased var + eps) over the last axis, written out."""
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def test_layernorm_uses_its_learned_affine_and_eps_1e_5():
    from dimr_lab.nn.norms import LayerNorm

    torch.manual_seed(0)
    norm = LayerNorm(8)
    with torch.no_grad():
        norm.norm.weight.copy_(torch.randn(8))
        norm.norm.bias.copy_(torch.randn(8))
    x = 0.01 * torch.randn(2, 5, 8)  # variance ~1e-4: eps = 1e-5 matters at the 5% level
    out, gate = norm(x, _plain_cond(2))
    assert gate is None
    torch.testing.assert_close(out, _ln_ref(x, 1e-5) * norm.norm.weight + norm.norm.bias)


def test_rmsnorm_and_td_rmsnorm_divide_by_the_root_mean_square_without_centring():
    from dimr_lab.nn.norms import RMSNorm, TDRMSNorm
    from dimr_lab.nn.time_dependent import collect

    torch.manual_seed(0)
    x = torch.randn(3, 4, 16) + 2.0  # a non-zero mean: RMSNorm must not subtract it
    rms = torch.sqrt((x**2).mean(-1, keepdim=True))
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.scale.copy_(torch.randn(16))
    out, gate = norm(x, _plain_cond(3))
    assert gate is None
    torch.testing.assert_close(out, x / (rms + 1e-8) * norm.scale)
    td = TDRMSNorm(16)
    _randomise_td(td)
    params = collect(td)
    cond = _plain_cond(3)
    cond.td = evaluate_all(params, cond.tau)
    gamma = td.scale.evaluate(cond.tau)  # (3, 16) per-sample scale
    torch.testing.assert_close(td(x, cond)[0], x / (rms + 1e-8) * gamma[:, None])


def _adaln_ref(norm, x, v):
    """DiT's modulate: LN(x) (no affine, eps 1e-6) * (1 + scale) + shift, (shift, scale[, gate]) = Linear(SiLU(v))."""
    mods = torch.nn.functional.linear(torch.nn.functional.silu(v), norm.modulation.weight, norm.modulation.bias)
    d = x.shape[-1]
    shift, scale = mods[:, None, :d], mods[:, None, d:2 * d]
    return _ln_ref(x, 1e-6) * (1 + scale) + shift, mods[:, None, 2 * d:]


@pytest.mark.parametrize("zero", [False, True])
def test_adaln_modulation_matches_dit(zero):
    from dimr_lab.nn.norms import AdaLN, AdaLNZero

    torch.manual_seed(0)
    norm = (AdaLNZero if zero else AdaLN)(8, cond_dim=6)
    assert not list(norm.norm.parameters())  # the inner LN has no affine of its own (DiT)
    x, v = torch.randn(2, 5, 8), torch.randn(2, 6)
    cond = _plain_cond(2, vector=v)
    # identity init: a plain LN, and adaLN-Zero's residual gate starts at exactly 0
    out0, gate0 = norm(x, cond)
    torch.testing.assert_close(out0, _ln_ref(x, 1e-6))
    if zero:
        assert gate0.shape == (2, 1, 8) and bool((gate0 == 0).all())
    with torch.no_grad():
        norm.modulation.weight.copy_(torch.randn_like(norm.modulation.weight))
        norm.modulation.bias.copy_(torch.randn_like(norm.modulation.bias))
    out, gate = norm(x, cond)
    ref, ref_gate = _adaln_ref(norm, x, v)
    torch.testing.assert_close(out, ref)
    if zero:
        torch.testing.assert_close(gate, ref_gate)
    else:
        assert gate is None


def test_token_conditioning_prepends_a_sinusoidal_time_token_and_the_class_token():
    from dimr_lab.nn.conditioning import TokenConditioning

    torch.manual_seed(0)
    cond = TokenConditioning(num_classes=5, dims=[8, 4], attention=[True, False], vector_dim=0)
    t, y = torch.tensor([0.1, 0.6]), torch.tensor([2, 5])  # 5 = the null label
    tok = cond.tokens(0, t, y)
    assert tok.shape == (2, 2, 8) and cond.tokens(1, t, y) is None
    # DDPM sinusoidal code of 1000 t: [cos(1000 t f_k), sin(1000 t f_k)], f_k = 10000^(-k / 4), k < 4
    f = torch.tensor([10000.0 ** (-k / 4) for k in range(4)])
    arg = 1000 * t[:, None] * f
    torch.testing.assert_close(tok[:, 0], torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1))
    torch.testing.assert_close(tok[:, 1], cond.class_embed["0"].weight[y])
    assert not torch.equal(tok[0, 0], tok[1, 0])  # the time token follows t


def test_a_block_window_keeps_the_condition_vector():
    v = torch.randn(2, 6)
    cond = _plain_cond(2, vector=v)
    cond.td = [torch.zeros(1, 3), torch.ones(1, 3), torch.full((1, 3), 2.0)]
    w = cond.window((1, 3))
    assert w.vector is v and len(w.td) == 2 and bool((w.td[0] == 1).all())


def test_per_sample_time_equals_one_sample_at_a_time():
    torch.manual_seed(0)
    model = build_model(TINY_2R).eval()
    _randomise_td(model)
    x, y, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 5]), torch.tensor([0.05, 0.5, 0.95])
    batched = model(x, t, y)
    for i in range(3):
        single = model(x[i:i + 1], t[i:i + 1], y[i:i + 1])
        for o_b, o_s in zip(batched, single):
            torch.testing.assert_close(o_b[i:i + 1], o_s, rtol=1e-5, atol=1e-5)


def test_td_tensors_are_evaluated_once_per_forward(monkeypatch):
    import dimr_lab.nn.network as network

    calls = []
    real = network.evaluate_all
    monkeypatch.setattr(network, "evaluate_all", lambda *a: calls.append(1) or real(*a))
    model = build_model(TINY_2R)
    model.set_checkpointing(True)
    outs = model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1]))
    outs[-1].mean().backward()  # recomputation in backward must not evaluate them again
    assert len(calls) == 1


def test_fused_td_evaluation_equals_per_tensor_evaluation():
    torch.manual_seed(0)
    model = build_model(TINY_2R)
    _randomise_td(model)
    tau = torch.tensor([-0.5, 0.25])
    fused = evaluate_all(model._td, tau)
    for p, v in zip(model._td, fused):
        torch.testing.assert_close(v, p.evaluate(tau))


def test_checkpointing_changes_nothing_but_memory():
    torch.manual_seed(0)
    model = build_model(TINY_2R)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1])
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_checkpointing(enabled)
        out = model(x, t, y)
        sum(o.square().mean() for o in out).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_attention_backends_agree():
    torch.manual_seed(0)
    ref = build_model({**TINY_2R, "attention": "math"}).eval()
    fast = build_model({**TINY_2R, "attention": "sdpa"}).eval()
    fast.load_state_dict(ref.state_dict())
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1])
    for a, b in zip(ref(x, t, y), fast(x, t, y)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_cascade_carries_gradient_into_the_lower_branch():
    model = build_model(TINY_2R)
    model(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1]))[-1].square().mean().backward()
    assert model.branches[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_optimizer_groups_keep_td_w_b_norms_and_biases_out_of_decay():
    model = build_model(TINY_2R)
    decay, free = optimizer_param_groups(model, 0.03)
    free_ids = {id(p) for p in free["params"]}
    td = [m for m in model.modules() if isinstance(m, TimeDependentParameter)]
    assert all(id(m.w) in free_ids and id(m.b) in free_ids for m in td)
    assert id(model.branches[0].blocks[0].attn.proj.bias) in free_ids
    assert id(model.branches[0].blocks[0].attn.qkv.weight) not in free_ids
    assert decay["weight_decay"] == 0.03 and free["weight_decay"] == 0.0
    released = optimizer_param_groups(model, 0.03, no_decay="td_only")
    assert len(released[1]["params"]) == 2 * len(td)
    assert len(decay["params"]) + len(free["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("patch,message", [
    ({"nrom": "tdln"}, "did you mean 'norm'"),
    ({"norm": "tdl"}, "did you mean 'tdln'"),
    ({"mlp": 3}, "mlp: expected a string"),
    ({"image_size": "32"}, "expected an integer"),
    ({"long_skip": "yes"}, "expected a boolean"),
    ({"branches": []}, "at least one branch"),
    ({"conditioning": "adaln"}, "needs an adaLN norm"),
    ({"norm": "adaln_zero"}, "conditioning = 'adaln'"),
    # the cascade and the heads have no residual branch: an adaLN-Zero there would build gates that never learn
    ({"conditioning": "adaln", "norm": "adaln_zero", "outer_norm": "adaln_zero"},
     r"model\.outer_norm: norm 'adaln_zero' gates a residual branch.*use one without a gate \(adaln"),
    ({"norm": "layernorm", "outer_norm": "layernorm"}, "time-dependent norms"),
    ({"branches": [{"block": "transformer", "width": 30, "heads": 4}]}, "not divisible by heads"),
    ({"branches": [{"block": "convnext", "kernel": 4}]}, "must be odd"),
    ({"branches": [{"patch": 3}]}, "not divisible"),
    ({"branches": [{"patch": 1}, {"patch": 2}]}, "must grow"),
    ({"branches": [{"block": "mamba"}]}, "unknown block 'mamba'"),
])
def test_spec_errors_name_the_key_and_what_is_allowed(patch, message):
    spec = {**copy.deepcopy(TINY_2R), **patch}
    with pytest.raises(SpecError, match=message) as err:
        resolve_model(spec, file="spec.toml", key="model")
    assert str(err.value).startswith("spec.toml: model")


def info_3r_gmacs() -> float:
    from dimr_lab.nn.describe import count

    return count({"preset": "dimr_tiny_3r"})["gmacs"]


def test_describe_cli_json_and_errors(capsys):
    from dimr_lab.cli import main

    main(["describe", "dimr_tiny_2r", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert isinstance(info["params"], int) and isinstance(info["gmacs"], float)
    assert info["params"] == sum(b["params"] for b in info["branches"]) + info["shared_params"]
    main(["describe", "dimr_tiny_3r"])  # a tiny network's GMACs to three figures, never '0.0'
    text = capsys.readouterr().out
    assert f"{info_3r_gmacs():.3g}" in text and " 0.0 " not in text
    for argv in (["describe", "dimr_tiny_2q"], ["describe", "dimr_tiny_2r", "--set", "norm=foo"],
                 ["describe", "missing.toml"], ["components", "norms"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err


def test_components_cli_lists_every_kind(capsys):
    from dimr_lab.cli import main

    main(["components"])
    out = capsys.readouterr().out
    for kind, name in COMPONENTS:
        assert name in out


def test_timm_registry_builds_presets():
    import timm

    import dimr_lab.nn.timm_models  # noqa: F401

    assert set(PRESETS) <= set(timm.list_models("*"))
    model = timm.create_model("dimr_tiny_2r", num_classes=3)
    assert model.spec.num_classes == 3 and model.spec.name == "DiMR-tiny/2R"


def test_help_does_not_import_torch():
    code = "import sys; from dimr_lab.cli import app; print('torch' in sys.modules, 'pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_per_branch_overrides_of_a_preset():
    spec = resolve_model({"preset": "dimr_tiny_3r", "branches": {"1": {"block": "transformer", "heads": 2}}})
    assert [b.block for b in spec.branches] == ["transformer", "transformer", "convnext"]
    assert spec.branches[1].heads == 2 and spec.branches[1].width == PRESETS["dimr_tiny_3r"]["branches"][1]["width"]
    with pytest.raises(SpecError, match="not a branch index"):
        resolve_model({"preset": "dimr_tiny_3r", "branches": {"3": {"width": 8}}})
    with pytest.raises(SpecError, match="need a preset"):
        resolve_model({**TINY_2R, "branches": {"0": {"width": 8}}})


def test_a_network_that_would_never_see_the_label_is_refused():
    """Class (and U-ViT's time) enter as tokens of attention branches: an all-ConvNeXt network with that
    conditioning is refused; unconditional, or with adaLN, it builds."""
    convnext = {"preset": "dimr_tiny_2r", "branches": {"0": {"block": "convnext"}}}
    with pytest.raises(SpecError, match="gives the class label to attention branches"):
        resolve_model(convnext)
    with pytest.raises(SpecError, match="the class label and the time"):
        resolve_model({**convnext, "conditioning": "token", "norm": "layernorm", "outer_norm": "layernorm"})
    assert resolve_model({**convnext, "num_classes": 0}).num_classes == 0  # time through the TD norms
    with pytest.raises(SpecError, match="gives the time to attention"):
        resolve_model({**convnext, "num_classes": 0, "conditioning": "token", "norm": "layernorm",
                       "outer_norm": "layernorm"})
    resolve_model({**convnext, "conditioning": "adaln", "norm": "adaln_zero", "outer_norm": "layernorm"})


def test_set_reaches_into_a_model_given_as_a_preset_name():
    """`model = "dimr_tiny_3r"` in a run spec takes `--set model.norm=...` (it said 'model is not a table')."""
    from dimr_lab.spec.run_spec import load_run_spec

    spec = load_run_spec({"model": "dimr_tiny_3r"}, [("model.norm", "layernorm"), ("model.branches.0.depth", 3)])
    assert spec.model.norm == "layernorm" and spec.model.branches[0].depth == 3
    assert spec.model.branches[1].width == PRESETS["dimr_tiny_3r"]["branches"][1]["width"]


def test_float32_attention_under_autocast_and_on_meta():
    """attention_fp32 attends in float32 under bf16 autocast, and still counts."""
    from dimr_lab.nn.describe import count

    spec = {**TINY_2R, "attention_fp32": True}
    assert count(spec)["gmacs"] == pytest.approx(count(TINY_2R)["gmacs"])
    model = build_model(spec)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1])
    seen = []
    model.branches[0].blocks[0].attn.backend = lambda q, k, v: seen.append(q.dtype) or torch.nn.functional.\
        scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert seen == [torch.float32] and all(torch.isfinite(o).all() for o in out)


def test_export_to_safetensors_and_load_back_through_dimr_lab_and_timm(tmp_path, capsys):
    import timm

    import dimr_lab
    import dimr_lab.nn.timm_models  # noqa: F401
    from conftest import cli
    from dimr_lab.spec.run_spec import load_run_spec
    from dimr_lab.train.trainer import train_run

    spec = load_run_spec(None, [("train.steps", 2), ("eval.enabled", False), ("sample.steps", 2),
                                ("sample.grid_size", 2), ("data.train_size", 64), ("train.batch_size", 8)])
    train_run(spec, tmp_path / "run", progress=False)
    out = tmp_path / "tiny.safetensors"
    code, _, err = cli(["export", tmp_path / "run", "--out", out], capsys)
    assert code == 0, err
    assert cli(["export", tmp_path / "run", "--out", out], capsys)[0] == 2  # no silent overwrite
    ckpt = dimr_lab.load_model(tmp_path / "run" / "checkpoints" / "last.pt")  # EMA weights
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.7]), torch.tensor([1, 2])
    with torch.no_grad():
        want = ckpt(x, t, y)
        for model in (dimr_lab.load_model(out),
                      timm.create_model("dimr_tiny_3r", pretrained=True, pretrained_cfg_overlay={"file": str(out)}),
                      timm.create_model("dimr_tiny_3r", pretrained=True,
                                        pretrained_cfg_overlay={"file": str(tmp_path / "run/checkpoints/last.pt")}),
                      timm.create_model("dimr_tiny_3r", checkpoint_path=str(out)).eval()):
            assert all(torch.equal(a, b) for a, b in zip(want, model(x, t, y)))
    with pytest.raises(Exception, match="no weights in timm's hub"):
        timm.create_model("dimr_tiny_3r", pretrained=True)


def test_weights_that_do_not_fit_are_named(tmp_path):
    """load_model names the tensors that keep a file from loading, and reads a stored spec only as a table."""
    from safetensors.torch import save_file

    import dimr_lab
    from dimr_lab.errors import UserError
    from dimr_lab.nn.checkpoint import SAFETENSORS_FORMAT
    from dimr_lab.spec.schema import to_dict

    model = _small_dimr()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    meta = {"format": SAFETENSORS_FORMAT, "model_spec": json.dumps(to_dict(model.spec))}
    first, second = list(state)[:2]
    cases = {
        "missing": ({k: v for k, v in state.items() if k != first}, f"missing {first}"),
        "extra": ({**state, "stray.weight": torch.zeros(2)}, "unexpected stray.weight"),
        "shape": ({**state, second: torch.zeros(3, 3)}, f"{second} is (3, 3) where the network has"),
    }
    for name, (tensors, fragment) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(UserError, match=re.escape(fragment)):
            dimr_lab.load_model(path)
    (tmp_path / "x.toml").write_text('[model]\npreset = "dimr_tiny_2r"\n')
    path = tmp_path / "named.safetensors"
    save_file(state, str(path), metadata={**meta, "model_spec": json.dumps("x.toml")})
    with pytest.raises(UserError, match="its model spec is not a table"):
        dimr_lab.load_model(path)


def _small_dimr():
    torch.manual_seed(0)
    return build_model({"preset": "dimr_tiny_2r", "branches": [{"width": 16, "depth": 1, "heads": 2},
                                                                 {"width": 8, "depth": 1}]})


def _assert_same_loss_and_grads(eager, compiled, compiled_params) -> None:
    """One forward and backward of both: the same loss and gradients within float rounding."""
    x, t, y = torch.randn(4, 3, 16, 16), torch.rand(4), torch.randint(0, 8, (4,))
    outs = [sum(o.square().mean() for o in m(x, t, y)) for m in (eager, compiled)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for o in outs:
        o.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_params):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_regional_compilation_compiles_each_kind_of_block_once_not_each_block_of_the_depth():
    """Regional compilation (`compile_blocks`) changes no result beyond float rounding, forward and backward,
    and seven Transformer blocks and three ConvNeXt blocks compile into two graphs, one per kind, none left
    eager: a block's TD tensors are numbered inside the block, so no guard differs by depth."""
    import torch._dynamo

    torch.manual_seed(0)
    model = build_model({"preset": "dimr_tiny_2r", "branches": [{"width": 16, "depth": 6, "heads": 2},
                                                                  {"width": 8, "depth": 2}]})
    eager = copy.deepcopy(model)
    assert len(model.branches[0].blocks) == 7 and len(model.branches[1].blocks) == 3
    slots = [b.td_slots for br in model.branches for b in br.blocks]
    assert all(s is not None for s in slots) and len(set(slots)) == len(slots)  # each block its own window
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.compile_blocks()
    _assert_same_loss_and_grads(eager, model, model.parameters())
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 2
    assert counters["frames"]["total"] == counters["frames"]["ok"]
    assert model.state_dict().keys() == eager.state_dict().keys()  # checkpoints hold the plain names


def test_a_block_reads_its_own_td_tensors_through_its_window():
    """Numbering TD tensors inside each block changes no output: every block still reads its own values."""
    from dimr_lab.nn.time_dependent import Cond, time_to_tau

    torch.manual_seed(0)
    model = build_model(TINY_2R)
    _randomise_td(model)
    t = torch.tensor([0.1, 0.7])
    tau = time_to_tau(t)
    cond = Cond(t=t, tau=tau, y=None, td=evaluate_all(model._td, tau))
    for branch in model.branches:
        for block in branch.blocks:
            start, end = block.td_slots
            inside = [m for m in block.modules() if isinstance(m, TimeDependentParameter)]
            assert [m.index for m in inside] == list(range(end - start))
            seen = cond.window(block.td_slots)
            for m in inside:
                torch.testing.assert_close(m(seen), m.evaluate(tau))


def test_depthwise_operator_is_the_convolution_with_the_bias_gradient_summed_in_another_order():
    """The ConvNeXt depthwise operator of the CPU path gives nn.Conv2d's forward, input gradient and weight
    gradient bit for bit; the bias gradient is the same sum within float rounding."""
    from dimr_lab.nn.depthwise import depthwise_conv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 7, padding=3, groups=16)
    x = torch.randn(4, 9, 9, 16, requires_grad=True)  # (B, H, W, d)
    go = torch.randn(4, 9, 9, 16)
    want = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    want.backward(go)
    grads = [x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()]
    for p in (x, conv.weight, conv.bias):
        p.grad = None
    got = depthwise_conv2d(x, conv.weight, conv.bias, 3)
    got.backward(go)
    assert torch.equal(got, want)
    assert torch.equal(x.grad, grads[0]) and torch.equal(conv.weight.grad, grads[1])
    # with the weight's own strides: DDP checks a gradient's strides against its bucket's (and warned of
    # oneDNN's stride 1 for the size-1 dimension every step)
    assert conv.weight.grad.stride() == conv.weight.stride()
    torch.testing.assert_close(conv.bias.grad, grads[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.bias.grad, go.sum((0, 1, 2)))
    torch.library.opcheck(torch.ops.dimr_lab.depthwise_conv2d.default, (x.detach(), conv.weight.detach(),
                                                                         conv.bias.detach(), 3))
    # the flop counter (describe, MFU) counts the operator's forward as the module's, and its backward as
    # twice that (torch's own formula for a grouped convolution's weight gradient ignores the groups)
    counts = {}
    for name, f in (("module", lambda: conv(x.permute(0, 3, 1, 2))), ("op", lambda: depthwise_conv2d(
            x, conv.weight, conv.bias, 3).permute(0, 3, 1, 2))):
        counter = torch.utils.flop_counter.FlopCounterMode(display=False)
        with counter:
            out = f()
        counts[name] = counter.get_total_flops()
        with counter:  # counts afresh
            out.permute(0, 2, 3, 1).backward(go)
        counts[name + " backward"] = counter.get_total_flops()
    assert counts["op"] == counts["module"] == 2 * 4 * 9 * 9 * 16 * 7 * 7
    assert counts["op backward"] == 2 * counts["op"]


def test_depthwise_operators_schemas_come_from_real_annotations():
    """custom_op infers each schema from the function's annotations: real types (no `from __future__ import
    annotations` in nn/depthwise.py), which torch 2.4, the floor, reads without evaluating strings."""
    import inspect

    from dimr_lab.nn import depthwise

    for op in (depthwise.depthwise_conv2d, depthwise.depthwise_conv2d_backward):
        sig = inspect.signature(op._init_fn)
        assert not any(isinstance(a, str) for a in [sig.return_annotation,
                                                    *(p.annotation for p in sig.parameters.values())]), sig
    assert str(torch.ops.dimr_lab.depthwise_conv2d_backward.default._schema) == (
        "dimr_lab::depthwise_conv2d_backward(Tensor grad, Tensor x, Tensor weight, SymInt padding) "
        "-> (Tensor, Tensor, Tensor)")


def test_convnext_block_on_the_cpu_uses_the_depthwise_operator_and_nn_conv2d_under_autocast(monkeypatch):
    """Eager CPU blocks go through the operator (same forward as the module); under CPU autocast they keep
    nn.Conv2d, which autocast casts (the operator would see mixed dtypes)."""
    from dimr_lab.nn import blocks

    net = _small_dimr()
    block = next(b for b in net.modules() if isinstance(b, blocks.ConvNeXtBlock))
    calls = []
    real = blocks.depthwise_conv2d
    monkeypatch.setattr(blocks, "depthwise_conv2d", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 3, 16, 16)
    t = torch.rand(2)
    y = torch.randint(0, 8, (2,))
    with torch.no_grad():
        plain = net(x, t, y)
        n_blocks = sum(isinstance(b, blocks.ConvNeXtBlock) for b in net.modules())
        assert len(calls) == n_blocks > 0
        feats = torch.randn(2, 8, 8, block.dwconv.in_channels)
        assert torch.equal(block.dwconv(feats.permute(0, 3, 1, 2)).permute(0, 2, 3, 1),
                           real(feats, block.dwconv.weight, block.dwconv.bias, block.dwconv.padding[0]))
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = net(x, t, y)
    assert not calls
    for a, b in zip(plain, mixed):
        assert a.shape == b.shape and torch.isfinite(b).all()


def test_compile_on_the_cpu_without_a_cpp_compiler_is_one_clear_error(monkeypatch):
    import shutil

    from dimr_lab.spec.preflight import check_compiler
    from dimr_lab.spec.run_spec import load_run_spec

    spec = load_run_spec(None, [("train.compile", True)])
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SpecError, match="train.compile: torch.compile on the CPU needs a C\\+\\+ compiler"):
        check_compiler(spec, torch.device("cpu"))
    check_compiler(spec, torch.device("cuda"))  # the GPU path does not ask for one
    check_compiler(load_run_spec(None, []), torch.device("cpu"))  # nor does the eager path
    compiled_eval = load_run_spec(None, [("eval.compile", True)])
    check_compiler(compiled_eval, torch.device("cpu"))  # training eagerly: train.compile is the key checked
    with pytest.raises(SpecError, match="eval.compile: torch.compile on the CPU needs a C\\+\\+ compiler"):
        check_compiler(compiled_eval, torch.device("cpu"), keys=("train.compile", "eval.compile"))


@pytest.mark.parametrize("preset", ["dimr_tiny_2r", "dit_tiny_4"])
def test_a_network_moved_to_bfloat16_or_half_runs_in_that_dtype(preset):
    """`.to(torch.bfloat16)` / `.half()`: TD tensors and adaLN's time embedding follow the weights' dtype (they
    stayed float32 and the first Linear refused them)."""
    model = build_model(preset).eval()
    s = model.spec
    x, t, y = torch.randn(2, s.in_channels, s.image_size, s.image_size), torch.tensor([0.3, 0.6]), torch.tensor([1, 2])
    with torch.no_grad():
        want = model(x, t, y)
        for dtype in (torch.bfloat16, torch.float16):
            low = copy.deepcopy(model).to(dtype)
            got = low(x.to(dtype), t, y)
            assert all(g.dtype == dtype for g in got)
            for a, b in zip(got, want):
                torch.testing.assert_close(a.float(), b, atol=0.1, rtol=0.1)
            with pytest.raises(UserError, match=r"x is torch.float32 but the network's weights are torch\.(bfloat16|float16)"):
                low(x, t, y)


def test_forward_takes_scalars_and_column_vectors_and_names_what_it_cannot_take():
    from dimr_lab.errors import UserError

    model = build_model(TINY_2R).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x, torch.tensor([0.4, 0.4]), torch.tensor([1, 1]), tau=torch.tensor([0.2, 0.2]))
        for t, y, tau in ((0.4, 1, 0.2), (torch.tensor([[0.4], [0.4]]), [1, 1], torch.tensor(0.2))):
            got = model(x, t, y, tau=tau)
            assert all(torch.allclose(a, b) for a, b in zip(got, want))
        bad = {
            "t": (x, torch.rand(3), None, r"t must be a scalar or hold one value per sample \(B = 2\), got shape \(3,\)"),
            "y": (x, 0.5, torch.tensor([0, 6]), r"labels must lie in 0\.\.4, or 5 \(null_label"),
            "float y": (x, 0.5, torch.tensor([0.0, 1.0]), "y must hold integer labels"),
            "channels": (torch.randn(2, 1, 16, 16), 0.5, None, r"x must be \(B, 3, 16, 16\)"),
            "size": (torch.randn(2, 3, 32, 32), 0.5, None, r"x must be \(B, 3, 16, 16\).*got \(2, 3, 32, 32\)"),
        }
        for name, (xx, t, y, message) in bad.items():
            with pytest.raises(UserError, match=message):
                model(xx, t, y)


def test_timm_pretrained_refuses_a_file_of_another_network(tmp_path):
    """`timm.create_model("dimr_tiny_3r", pretrained=True, ...)` on a DiT's file handed back the DiT."""
    import timm

    import dimr_lab.nn.timm_models  # noqa: F401
    from dimr_lab.nn.checkpoint import export_safetensors, model_payload, write_checkpoint
    from dimr_lab.spec.schema import to_dict

    dit = build_model("dit_tiny_4")
    write_checkpoint(tmp_path / "dit.pt", model_payload(dit))
    export_safetensors(tmp_path / "dit.safetensors", to_dict(dit.spec), dit.state_dict())
    for file in ("dit.pt", "dit.safetensors"):
        path = tmp_path / file
        with pytest.raises(UserError, match=r"holds a DiT-tiny/4 network, not DiMR-tiny/3R \(dimr_tiny_3r\); load it "
                                            r"with timm.create_model\('dit_tiny_4'"):
            timm.create_model("dimr_tiny_3r", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        assert timm.create_model("dit_tiny_4", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).spec.name \
            == "DiT-tiny/4"


def test_components_list_the_model_keys_they_read():
    """`dimr-lab components` named neither attention_fp32 (transformer blocks) nor time_embed_dim (adaLN)."""
    import dataclasses

    from dimr_lab.spec.model_spec import BranchSpec, ModelSpec

    fields = {f"model.{f.name}" for f in dataclasses.fields(ModelSpec)} \
        | {f"model.branches.N.{f.name}" for f in dataclasses.fields(BranchSpec)}
    for kind, name in COMPONENTS:
        assert set(KINDS[kind].entry(name).keys) <= fields, (kind, name)
    assert "model.attention_fp32" in KINDS["block"].entry("transformer").keys
    for kind, name in (("conditioning", "adaln"), ("norm", "adaln"), ("norm", "adaln_zero")):
        assert "model.time_embed_dim" in KINDS[kind].entry(name).keys

    def shapes(spec):
        return {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}

    dit = {"preset": "dit_tiny_4"}  # adaln conditioning and norms: the condition vector's width
    assert shapes({**dit, "time_embed_dim": 24}) != shapes(dit)
    uvit = {"preset": "uvit_tiny_4"}  # token conditioning does not read it
    assert shapes({**uvit, "time_embed_dim": 24}) == shapes(uvit)


def test_every_kind_of_component_is_chosen_by_a_spec_key(capsys):
    """`components` listed each kind's names but not the key a spec chooses them with (which key takes a
    pos_embed, a head?); every registered name is reachable from a run spec through that key."""
    from conftest import cli
    from dimr_lab.spec.keys import choosing_keys
    from dimr_lab.spec.run_spec import load_run_spec

    assert choosing_keys("norm") == ["model.norm", "model.outer_norm"]
    assert choosing_keys("block") == ["model.branches.N.block"]
    assert choosing_keys("metric") == ["eval.metrics"]
    for kind, registry in KINDS.items():
        keys = choosing_keys(kind)
        assert keys, f"no spec key takes a {kind}"
        for name in registry.names():  # each name passes the key's own check (the spec's other rules aside)
            for key in keys:
                value = [name] if key == "eval.metrics" else name
                try:
                    load_run_spec(None, [(key.replace(".N.", ".0."), value)])
                except SpecError as err:
                    assert f"unknown {kind}" not in str(err), (key, name, str(err))
    code, out, err = cli(["components", "head"], capsys)
    assert code == 0, err
    assert "head: model.head" in out and "norm:" not in out.split("chosen in a run spec by")[1]
    code, out, _ = cli(["components"], capsys)
    for kind in KINDS:
        assert f"{kind}: {', '.join(choosing_keys(kind))}" in out


def test_the_readme_model_example_names_every_network_component():
    """README's [model] example lists the choices of each model-level kind (pos_embed and head were missing),
    and it is a valid model spec as written."""
    import pathlib
    import re
    import tomllib

    from dimr_lab.spec.keys import choosing_keys

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if b.startswith("[model]")]
    spec = resolve_model(tomllib.loads(block)["model"])
    assert spec.name == "DiMR-XL/2R" and len(spec.branches) == 2
    lines: dict[str, str] = {}
    for line in block.splitlines():  # a key's first line (the first branch's block = ...)
        if "=" in line:
            lines.setdefault(line.split("=")[0].strip(), line)
    for kind, registry in KINDS.items():
        key = choosing_keys(kind)[0]  # norm: model.norm's line (outer_norm takes the same names)
        if not key.startswith("model."):
            continue
        line = lines[key.split(".")[-1]]
        for name in registry.names():
            assert re.search(rf"(?<![\w+]){re.escape(name)}(?![\w+])", line), (kind, name, line)


def test_keys_lists_every_spec_key_with_its_default(capsys):
    """`dimr-lab keys` names every key a run spec takes; each, set to the default it shows, is accepted."""
    import dataclasses

    from conftest import cli
    from dimr_lab.spec.keys import spec_keys
    from dimr_lab.spec.model_spec import BranchSpec, ModelSpec
    from dimr_lab.spec.run_spec import DataSpec, DiffusionSpec, EvalSpec, RunSpec, SampleSpec, TrackSpec, \
        TrainSpec, load_run_spec

    rows = spec_keys()
    listed = [k.key for k in rows]
    want = {f"model.{f.name}" for f in dataclasses.fields(ModelSpec)} \
        | {f"model.branches.N.{f.name}" for f in dataclasses.fields(BranchSpec)} | {"model.preset"}
    for section, cls in (("data", DataSpec), ("diffusion", DiffusionSpec), ("train", TrainSpec),
                         ("sample", SampleSpec), ("eval", EvalSpec), ("track", TrackSpec)):
        want |= {f"{section}.{f.name}" for f in dataclasses.fields(cls)}
    assert {f.name for f in dataclasses.fields(RunSpec)} == {k.split(".")[0] for k in want}
    assert set(listed) == want and len(listed) == len(want)
    by_key = {k.key: k for k in rows}
    assert by_key["train.lr"].default == 2e-4 and by_key["train.lr_schedule"].allowed.endswith("constant, cosine")
    assert by_key["data.shape_palette"].allowed == "'contrast', 'random'"
    for k in rows:
        if k.key in ("model.preset", "model.branches", "model.name") or k.key.startswith("model.branches.N."):
            continue
        spec = load_run_spec({}, [(k.key, k.default)])  # the bare schema: each default is what it gets
        section, name = k.key.split(".")
        assert getattr(getattr(spec, section), name) == k.default or section == "model" or k.key == \
            "data.image_size", k.key
    code, out, err = cli(["keys", "sample", "--json"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["key"] for r in lines] == [k for k in listed if k.startswith("sample.")]
    code, out, err = cli(["keys", "trian"], capsys)
    assert code == 2 and out == "" and "\n" not in err.strip()
    assert "unknown spec section 'trian'" in err and "did you mean 'train'" in err


def test_an_export_loads_whatever_its_file_is_called(tmp_path):
    """A safetensors export renamed without its suffix was read with torch.load: 'corrupt or unreadable'."""
    import dimr_lab
    from dimr_lab.nn.checkpoint import export_safetensors
    from dimr_lab.spec.schema import to_dict

    model = _small_dimr().eval()
    export_safetensors(tmp_path / "net.weights", to_dict(model.spec), model.state_dict())
    loaded = dimr_lab.load_model(tmp_path / "net.weights")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    (tmp_path / "junk.pt").write_bytes(b"\x05" + b"\0" * 7 + b"{not json")
    with pytest.raises(UserError, match="junk.pt: not a readable safetensors file"):
        dimr_lab.load_model(tmp_path / "junk.pt")


def test_xformers_that_does_not_import_falls_back_to_sdpa(tmp_path, monkeypatch):
    """An xformers built for another torch or CUDA raises more than ImportError on import (OSError,
    RuntimeError): the 'xformers' backend falls back to SDPA with a warning saying why, as without xformers."""
    import dimr_lab.nn.attention as attention

    pkg = tmp_path / "xformers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise OSError('libcudart.so.11.0: cannot open shared object file')\n")
    (pkg / "ops.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("xformers", "xformers.ops"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    # a fresh import cache for this test; the module's own comes back afterwards
    monkeypatch.setattr(attention, "_xformers_ops", functools.cache(attention._xformers_ops.__wrapped__))
    monkeypatch.setattr(attention, "_warned_xformers", False)
    q, k, v = torch.randn(3, 2, 4, 6, 8).unbind(0)
    with pytest.warns(UserWarning, match="xformers does not import \\(OSError: libcudart"):
        out = attention.xformers_attention(q, k, v)
    torch.testing.assert_close(out, attention.sdpa_attention(q, k, v))


@pytest.mark.slow
def test_xformers_absent_is_sdpa_from_the_start_so_a_compiled_block_is_one_graph(monkeypatch):
    """Without xformers the 'xformers' backend is SDPA from the network's construction: a compiled block
    (train.compile) no longer traces the failing import at every attention, which split each Transformer
    block into several graphs around it."""
    import torch._dynamo

    import dimr_lab.nn.attention as attention

    monkeypatch.setitem(sys.modules, "xformers", None)  # absent, whatever this machine has
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    monkeypatch.setattr(attention, "_xformers_ops", functools.cache(attention._xformers_ops.__wrapped__))
    monkeypatch.setattr(attention, "_warned_xformers", False)
    torch.manual_seed(0)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 3])
    with pytest.warns(UserWarning, match="attention 'xformers': xformers is not installed; using 'sdpa'"):
        model = build_model({"preset": "uvit_tiny_4", "attention": "xformers", "long_skip": False,
                             "branches": [{"width": 16, "depth": 1, "heads": 2}]})
        eager = copy.deepcopy(model)
        torch._dynamo.reset()
        model.compile_blocks(fullgraph=True)  # a graph break is an error
        compiled = model(x, t, y)[0]
    torch.testing.assert_close(compiled, eager(x, t, y)[0], rtol=1e-4, atol=1e-6)
