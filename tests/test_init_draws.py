"""train.init_draws: 'stream' (the default) is today's initialisation bit for bit; 'by_name' draws every random
tensor from its own generator keyed by (train.seed, its qualified name), with the same distributions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import cli
from test_train import tiny_spec, tiny_spec_file

from dimr_lab.errors import SpecError
from dimr_lab.nn.network import MultiResolutionNet, build_model
from dimr_lab.registry import BLOCKS, CASCADES, CONDITIONING, HEADS, MLPS, NORMS, POS_EMBEDS
from dimr_lab.runner.plan import expand
from dimr_lab.spec.ablation import load_ablation
from dimr_lab.spec.model_spec import resolve_model
from dimr_lab.spec.run_spec import load_run_spec

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["dimr_tiny_3r", "dimr_tiny_2r", "uvit_tiny_4", "dit_tiny_4"]
# what neither the tiny presets nor the two files' tiny profiles build
EXTRA = {"preset": "dimr_tiny_2r", "norm": "rmsnorm", "outer_norm": "layernorm", "pos_embed": "none",
         "conditioning": "token"}


def _variants(name: str) -> dict[str, object]:
    """The model of each variant of an ablation file's tiny profile, by variant name."""
    abl = load_ablation(ROOT / "ablations" / f"{name}.toml")
    return {r.variant: r.spec.model for r in expand(abl, "tiny", results=Path("/nonexistent"), seeds=[0])}


TABLE2 = _variants("table2_components")
TDLN = _variants("tdln_vs_adaln")
MODELS = {**{p: resolve_model(p) for p in PRESETS}, "extra": resolve_model(EXTRA),
          **{f"table2-{k}": v for k, v in TABLE2.items()}, **{f"tdln_vs_adaln-{k}": v for k, v in TDLN.items()}}


def _build(model, draws: str, seed: int, global_seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(global_seed)
    return build_model(model, init_draws=draws, seed=seed).state_dict()


def _random_names(model) -> set[str]:
    """The tensors whose stream initialisation depends on the global generator."""
    a, b = _build(model, "stream", 0, 1), _build(model, "stream", 0, 2)
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_every_registered_network_component_is_covered():
    used = {k: set() for k in ("norm", "block", "conditioning", "head", "cascade", "pos_embed", "mlp")}
    for s in MODELS.values():
        used["norm"] |= {s.norm, s.outer_norm}
        used["block"] |= {b.block for b in s.branches}
        for k in ("conditioning", "head", "cascade", "pos_embed", "mlp"):
            used[k].add(getattr(s, k))
    for kind, reg in (("norm", NORMS), ("block", BLOCKS), ("conditioning", CONDITIONING), ("head", HEADS),
                      ("cascade", CASCADES), ("pos_embed", POS_EMBEDS), ("mlp", MLPS)):
        assert {e.name for e in reg.entries()} <= used[kind], kind


@pytest.mark.parametrize("name", list(MODELS))
def test_by_name_does_not_read_the_global_stream(name):
    """(1) by_name: the same network from two global seeds, bit for bit; stream differs (the test can fail)."""
    model = MODELS[name]
    a, b = _build(model, "by_name", 7, 1), _build(model, "by_name", 7, 2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert _random_names(model)  # under stream the same two global seeds give other weights
    # the global generator ends where stream's build leaves it (whatever draws from it next is unchanged)
    torch.manual_seed(3)
    build_model(model)
    after_stream = torch.random.get_rng_state()
    torch.manual_seed(3)
    build_model(model, init_draws="by_name", seed=7)
    assert torch.equal(torch.random.get_rng_state(), after_stream)


def _alike(sa: dict, sb: dict) -> list[str]:
    """Tensors both networks hold by name and shape, in modules whose own tensors all have the same shapes
    (a convolution's bias bound depends on its weight's fan-in)."""
    def module_shapes(sd, prefix):
        return {k: tuple(v.shape) for k, v in sd.items() if k.rsplit(".", 1)[0] == prefix}

    return [k for k in sa if k in sb and sa[k].shape == sb[k].shape
            and module_shapes(sa, k.rsplit(".", 1)[0]) == module_shapes(sb, k.rsplit(".", 1)[0])]


@pytest.mark.parametrize("file,a,b,stream_differs", [
    ("table2", "multi_branch", "dimr", True), ("table2", "uvit", "adaln_zero", True), ("table2", "tdln", "glu", True),
    ("tdln_vs_adaln", "tdln", "adaln", True), ("tdln_vs_adaln", "tdln", "adaln_zero", True),
    ("tdln_vs_adaln", "tdln", "ln_time_token", False)])  # the time token draws nothing: stream shares them too
def test_variants_share_the_initial_values_of_what_they_share(file, a, b, stream_differs):
    """(2) by_name: two variants of one seed give the same values to every tensor they share by name and shape;
    under stream most of the random ones differ where a variant adds or changes a random tensor (what the
    option is for)."""
    variants = TABLE2 if file == "table2" else TDLN
    ma, mb = variants[a], variants[b]
    random = _random_names(ma)
    ba, bb = _build(ma, "by_name", 0, 0), _build(mb, "by_name", 0, 0)
    shared = _alike(ba, bb)
    assert len([k for k in shared if k in random]) >= 10
    assert [k for k in shared if not torch.equal(ba[k], bb[k])] == []
    sa, sb = _build(ma, "stream", 0, 0), _build(mb, "stream", 0, 0)
    differ = [k for k in shared if k in random and not torch.equal(sa[k], sb[k])]
    assert (len(differ) > len([k for k in shared if k in random]) // 2) == stream_differs
    # another seed: other values
    other = _build(ma, "by_name", 1, 0)
    assert all(not torch.equal(ba[k], other[k]) for k in random)


@pytest.mark.parametrize("name", ["dimr_tiny_3r", "dit_tiny_4", "uvit_tiny_4", "extra"])
def test_by_name_keeps_every_tensors_distribution(name):
    """(3) Linear and Embedding weights trunc-normal std 0.02, conv weights and biases within PyTorch's
    kaiming-uniform bound, deterministic tensors (biases, norms, TD tensors, adaLN-Zero's zeros) as under
    stream."""
    spec = MODELS[name]
    torch.manual_seed(0)
    net = build_model(spec, init_draws="by_name", seed=3)
    stream = _build(spec, "stream", 3, 0)
    random = _random_names(spec)
    seen = set()
    for mname, m in net.named_modules():
        p = f"{mname}." if mname else ""
        if isinstance(m, (nn.Linear, nn.Embedding)) and p + "weight" in random:
            w = m.weight.detach()
            assert w.abs().max() <= 2.0  # trunc_normal_'s bounds
            if w.numel() >= 2000:
                assert w.std().item() == pytest.approx(0.02, rel=0.1), mname
                assert w.mean().abs().item() < 0.002
            seen.add(p + "weight")
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) and the bias's bound
            for t in (m.weight, m.bias):
                assert t.abs().max().item() <= bound
            if m.weight.numel() >= 500:
                assert m.weight.abs().max().item() > 0.9 * bound
                assert m.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
            seen |= {p + "weight", p + "bias"}
    state = net.state_dict()
    assert random <= seen  # every random tensor is a Linear, Embedding or conv one
    for k in state:
        if k in random:
            assert not torch.equal(state[k], stream[k]), k
            if state[k].numel() >= 100:  # the same spread as stream's draw (fewer numbers: bounds above)
                assert state[k].std().item() == pytest.approx(stream[k].std().item(), rel=0.15), k
        else:
            assert torch.equal(state[k], stream[k]), k
    if name == "dit_tiny_4":
        zero = [k for k in state if "modulation" in k]
        assert zero and all(not state[k].any() for k in zero)


@pytest.mark.parametrize("name", PRESETS + ["extra", "table2-uvit", "tdln_vs_adaln-adaln"])
def test_stream_is_the_old_initialisation(name):
    """(4) stream (and the default) is what `torch.manual_seed(s); build_model(spec)` gave before the option."""
    spec = MODELS[name]
    torch.manual_seed(5)
    old = MultiResolutionNet(resolve_model(spec)).state_dict()  # the old build_model, by hand
    for new in (_build(spec, "stream", 123, 5), (torch.manual_seed(5), build_model(spec).state_dict())[1]):
        assert new.keys() == old.keys() and all(torch.equal(old[k], new[k]) for k in old)


def test_spec_key_choices_and_identity(tmp_path, capsys):
    stream = tiny_spec(tmp_path)
    assert stream.train.init_draws == "stream" and "init_draws" not in stream.identity()["train"]
    explicit = tiny_spec(tmp_path, overrides=[("train.init_draws", "stream")])
    assert explicit.identity_hash() == stream.identity_hash()
    by_name = tiny_spec(tmp_path, overrides=[("train.init_draws", "by_name")])
    assert by_name.identity()["train"]["init_draws"] == "by_name"
    assert by_name.identity_hash() != stream.identity_hash()
    with pytest.raises(SpecError, match="'byname' is not allowed; allowed: 'stream', 'by_name'"):
        tiny_spec(tmp_path, overrides=[("train.init_draws", "byname")])
    code, out, err = cli(["train", tiny_spec_file(tmp_path), "--out", tmp_path / "run", "--no-progress",
                          "--set", "train.init_draws=byname"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "train.init_draws" in err


@pytest.mark.parametrize("draws", ["by_name", "stream"])
def test_trainer_starts_from_the_drawn_weights(tmp_path, draws):
    """(5) A run trains from build_model(model, init_draws, seed) (lr 0: the checkpoint holds the initial
    weights); under by_name another train.seed gives other weights."""
    from dimr_lab.train.trainer import train_run

    got = {}
    for seed in (0, 1):
        spec = tiny_spec(tmp_path, steps=1, ckpt=1, overrides=[("train.init_draws", draws), ("train.lr", 0.0),
                                                               ("train.seed", seed), ("train.weight_decay", 0.0)])
        train_run(spec, tmp_path / f"{draws}-{seed}", progress=False)
        ckpt = torch.load(tmp_path / f"{draws}-{seed}" / "checkpoints" / "last.pt", map_location="cpu",
                          weights_only=False)
        torch.manual_seed(seed)  # the trainer's own seeding; by_name must not depend on it
        if draws == "by_name":
            torch.manual_seed(999)
        expect = build_model(spec.model, init_draws=draws, seed=seed).state_dict()
        assert all(torch.equal(ckpt["model"][k], expect[k]) for k in expect)
        got[seed] = ckpt["model"]
    random = _random_names(spec.model)
    assert random and all(not torch.equal(got[0][k], got[1][k]) for k in random)


def test_by_name_refuses_what_it_cannot_draw_again():
    """A random tensor the module's own init does not make (no reset_parameters, or a parent re-drew a child's
    weights another way) is an error, not a silent change of distribution."""
    from dimr_lab.nn.init_draws import build_by_name
    from dimr_lab.nn.network import _reinit

    class Free(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(4) * 0.1)

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            nn.init.xavier_uniform_(self.lin.weight)

    class Zeroed(nn.Module):  # a parent's deterministic override is kept
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3)
            nn.init.zeros_(self.conv.bias)

    with pytest.raises(RuntimeError, match="scale .Free. is initialised randomly but its module has no reset_"):
        build_by_name(Free, 0, _reinit)
    with pytest.raises(RuntimeError, match="does not give lin.weight its value as the construction did"):
        build_by_name(Parent, 0, _reinit)
    torch.manual_seed(0)
    a = build_by_name(Zeroed, 0, _reinit)
    torch.manual_seed(1)
    b = build_by_name(Zeroed, 0, _reinit)
    assert not a.conv.bias.any() and torch.equal(a.conv.weight, b.conv.weight)


def test_a_network_by_name_cannot_draw_again_is_one_line_exit_2_in_the_cli(tmp_path, capsys):
    """A registered component with a random tensor but no reset_parameters(): train under by_name said nothing
    but a RuntimeError's traceback; now one line naming train.init_draws, the tensor and what is allowed, exit 2,
    no run folder made. build_model still raises a RuntimeError for Python callers."""
    from dimr_lab.nn.norms import Norm
    from dimr_lab.registry import NORMS

    class NoisyNorm(Norm):
        def __init__(self, dim: int, cond_dim: int = 0):
            super().__init__(dim)
            self.scale = nn.Parameter(1 + 0.01 * torch.randn(dim))

        def forward(self, x, cond):
            return x * self.scale, None

    NORMS.register("scratch_noisy_norm", "a norm with a random scale and no reset_parameters")(NoisyNorm)
    try:
        code, out, err = cli(["train", tiny_spec_file(tmp_path), "--out", tmp_path / "run", "--no-progress",
                              "--set", "train.init_draws=by_name", "--set", "model.norm=scratch_noisy_norm"],
                             capsys)
        with pytest.raises(RuntimeError, match="train.init_draws"):
            build_model({"preset": "dimr_tiny_2r", "norm": "scratch_noisy_norm"}, init_draws="by_name")
    finally:
        NORMS._entries.pop("scratch_noisy_norm", None)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "train.init_draws" in err and "norm" in err and "(NoisyNorm)" in err and "'stream'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("draws", ["stream", "by_name"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does_without_drawing_by_name_again(tmp_path, monkeypatch,
                                                                                         draws):
    """A resumed by_name run drew every initial tensor again (seconds at the largest presets) only for the
    checkpoint to replace them all: it builds as stream does now (the global generator ends in the same place,
    and the checkpoint restores every generator anyway), and in both modes a run stopped and resumed ends bit
    for bit where the uninterrupted one ends."""
    import json

    import dimr_lab.nn.init_draws as init_draws
    from dimr_lab.train.trainer import train_run

    calls = []
    real = init_draws.build_by_name

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(init_draws, "build_by_name", counted)
    spec = tiny_spec(tmp_path, steps=6, ckpt=100, overrides=[("train.init_draws", draws), ("train.threads", 1)])
    ref, run = tmp_path / "ref", tmp_path / "run"
    train_run(spec, ref, progress=False)
    asked = iter(range(100))
    assert train_run(spec, run, should_stop=lambda: next(asked) == 3, progress=False) == {"interrupted": True,
                                                                                          "step": 3}
    drawn_before = len(calls)
    assert drawn_before == (2 if draws == "by_name" else 0)  # each fresh session draws by name
    assert train_run(spec, run, progress=False)["step"] == 6
    assert len(calls) == drawn_before  # the resumed one does not
    a, b = (torch.load(r / "checkpoints" / "last.pt", map_location="cpu", weights_only=True) for r in (ref, run))
    assert a["step"] == b["step"] == 6 and a["data_position"] == b["data_position"]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for k in ("torch", "noise"):
        assert torch.equal(a["rng"][k], b["rng"][k]), k
    assert torch.equal(a["rng"]["numpy"]["keys"], b["rng"]["numpy"]["keys"])
    rows = [[json.loads(x)["loss"] for x in (r / "log.jsonl").read_text().splitlines()] for r in (ref, run)]
    assert rows[0] == rows[1] and len(rows[0]) == 6
