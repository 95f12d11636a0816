"""Weights of the released DiMR code (github qihao067/DiMR) <-> dimr-lab networks.

The released model (`MRModel`) is a list of stages, lowest resolution first; its state dict names
tensors `stages.<i>.<part>`. Nothing but the tensors is needed to rebuild the architecture:

    stages.i.input_layer.1.weight                 (d, C, p, p)    patchify conv: width, channels, patch
    stages.i.input_layer.3.position_embeddings    (R*R, d)        learned positions: resolution R
    stages.i.class_embeds.weight                  (K + 1, d)      class token (Transformer stages)
    stages.i.upsample.{0,1.kernel,2}              cascade from stage i-1: TD-LN, Linear, TD-LN
    stages.i.blocks.j.block1.query_key_value      Transformer block (attention half)
    stages.i.blocks.j.block1.1                    ConvNeXt block (depthwise k x k conv)
    stages.i.blocks.j.block{1,2}.norm.*           block norms: scale.param* (TD-RMSNorm),
                                                  weight/bias.param* (TD-LayerNorm), scale (RMSNorm)
    stages.i.blocks.j.block2.w{0,1,2}             GLU: hidden width
    stages.i.skip_denses.k                        U-ViT long skips (n // 2 of them)
    stages.i.output_layer.{0,2}                   head: TD-LN, k x k conv

A time-dependent tensor is stored as `param0, param1, nodecay_weight, nodecay_bias`; those are our
`p0, p1, w, b` (the released code adds 1 to nodecay_weight exactly as we add 1 to w). The cascade's
Linear output is read as (r_h, r_w, d) by both codes, so its rows are copied as they are.

What the tensors cannot say: the number of attention heads (a flag, default 16) and an input area
down-sampling (inferred as image_size / (resolution * patch), with image_size the largest
resolution * patch over the stages). Anything that cannot be placed is refused, naming the key.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from dimr_lab.errors import UserError

TD_PARTS = {"param0": "p0", "param1": "p1", "nodecay_weight": "w", "nodecay_bias": "b"}
_NORM_KEYS = {  # our norm name -> [(released suffix, our suffix)] below `...norm.`
    "tdrmsnorm": [(f"scale.{o}", f"scale.{u}") for o, u in TD_PARTS.items()],
    "tdln": [(f"{n}.{o}", f"{n}.{u}") for n in ("weight", "bias") for o, u in TD_PARTS.items()],
    "rmsnorm": [("scale", "scale")],
}
# where a checkpoint wraps its tensors; the EMA weights first: a file holding both is sampled from its EMA,
# as the released evaluation does (nnet_ema.pth)
_WRAPPERS = ("nnet_ema", "ema", "state_dict", "model", "nnet", "module", "net", "network")
_PREFIXES = ("module.", "_orig_mod.")
RELEASED_SUFFIX = " (released weights)"  # what a converted network's name adds to its preset's name


def _td(official: str, ours: str) -> list[tuple[str, str]]:
    return [(f"{official}.{o}", f"{ours}.{u}") for o, u in TD_PARTS.items()]


def _lin(official: str, ours: str, bias: bool = True) -> list[tuple[str, str]]:
    return [(f"{official}.weight", f"{ours}.weight")] + ([(f"{official}.bias", f"{ours}.bias")] if bias else [])


def key_pairs(spec: Any) -> list[tuple[str, str]]:
    """(released key, our key) for every tensor of a network of `spec` (which must be DiMR-shaped)."""
    _check_representable(spec)
    pairs: list[tuple[str, str]] = []
    for i, b in enumerate(spec.branches):
        s, o = f"stages.{i}", f"branches.{i}"
        pairs += _lin(f"{s}.input_layer.1", f"{o}.patch_embed")
        pairs.append((f"{s}.input_layer.3.position_embeddings.weight", f"{o}.pos_embed.table.weight"))
        transformer = b.block == "transformer"
        if transformer:
            pairs.append((f"{s}.class_embeds.weight", f"conditioning.class_embed.{i}.weight"))
        if i > 0:
            pairs += _td(f"{s}.upsample.0.weight", f"{o}.cascade.norm_in.weight")
            pairs += _td(f"{s}.upsample.0.bias", f"{o}.cascade.norm_in.bias")
            pairs += _lin(f"{s}.upsample.1.kernel", f"{o}.cascade.proj")
            pairs += _td(f"{s}.upsample.2.weight", f"{o}.cascade.norm_out.weight")
            pairs += _td(f"{s}.upsample.2.bias", f"{o}.cascade.norm_out.bias")
        n = b.depth // 2 * 2 + 1
        for j in range(n):
            sb, ob = f"{s}.blocks.{j}", f"{o}.blocks.{j}"
            if transformer:
                pairs += [(f"{sb}.block1.norm.{a}", f"{ob}.norm1.{u}") for a, u in _NORM_KEYS[spec.norm]]
                pairs += _lin(f"{sb}.block1.query_key_value", f"{ob}.attn.qkv", bias=spec.qkv_bias)
                pairs += _lin(f"{sb}.block1.dense", f"{ob}.attn.proj")
            else:
                pairs += _lin(f"{sb}.block1.1", f"{ob}.dwconv")
            pairs += [(f"{sb}.block2.norm.{a}", f"{ob}.norm2.{u}") for a, u in _NORM_KEYS[spec.norm]]
            for w in ("w0", "w1", "w2"):
                pairs += _lin(f"{sb}.block2.{w}", f"{ob}.mlp.{w}")
        for k in range(n // 2):
            pairs += _lin(f"{s}.skip_denses.{k}", f"{o}.skip_proj.{k}")
        pairs += _td(f"{s}.output_layer.0.weight", f"{o}.head.norm.weight")
        pairs += _td(f"{s}.output_layer.0.bias", f"{o}.head.norm.bias")
        pairs += _lin(f"{s}.output_layer.2", f"{o}.head.conv")
    return pairs


def _check_representable(spec: Any) -> None:
    """The released code builds only DiMR's design; refuse a spec it cannot express."""
    fixed = {"conditioning": "norm", "outer_norm": "tdln", "mlp": "glu", "pos_embed": "learned",
             "cascade": "dimr", "head": "conv", "long_skip": True}
    for key, value in fixed.items():
        if getattr(spec, key) != value:
            raise UserError(f"the released DiMR code has no equivalent of {key} = {getattr(spec, key)!r} "
                            f"(it needs {value!r})")
    if spec.norm not in _NORM_KEYS:
        raise UserError(f"the released DiMR code has no equivalent of norm = {spec.norm!r} "
                        f"(known: {', '.join(_NORM_KEYS)})")
    for i, b in enumerate(spec.branches):
        if b.block not in ("transformer", "convnext"):
            raise UserError(f"branches[{i}]: the released DiMR code has no {b.block!r} block")


# ---------------------------------------------------------------------------------------------------
# released -> ours


def unwrap_state_dict(obj: Any, *, source: str = "state dict", took: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a checkpoint (a bare state dict or one wrapped under a usual key, the
    keys it went through appended to `took`), without a DataParallel `module.` or torch.compile `_orig_mod.`
    prefix."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and not all(torch.is_tensor(v) for v in obj.values()):
            key = next((k for k in _WRAPPERS if isinstance(obj.get(k), dict) and obj[k]), None)
            if key is None:
                odd = next(k for k, v in obj.items() if not torch.is_tensor(v))
                raise UserError(f"{source}: not a state dict of tensors (key {odd!r} holds a "
                                f"{type(obj[odd]).__name__}; looked for a wrapped one under {', '.join(_WRAPPERS)})")
            if took is not None:
                took.append(key)
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and torch.is_tensor(v)
                                                       for k, v in obj.items()):
        raise UserError(f"{source}: not a state dict of tensors (got {type(obj).__name__})")
    out = {}
    for key, value in obj.items():
        name = key
        stripped = True
        while stripped:
            stripped = False
            for p in _PREFIXES:
                if name.startswith(p):
                    name, stripped = name[len(p):], True
        if name in out:
            raise UserError(f"{source}: key {key!r} collides with another once its prefix is removed")
        out[name] = value
    return out


def _need(sd: dict[str, torch.Tensor], key: str, dims: int | None = None) -> torch.Tensor:
    if key not in sd:
        raise UserError(f"released state dict: missing {key!r} (needed to infer the architecture)")
    value = sd[key]
    if dims is not None and value.dim() != dims:
        raise UserError(f"released state dict: {key!r} has shape {tuple(value.shape)}, expected {dims} dims")
    return value


def _indices(keys: Iterator[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def infer_spec_dict(sd: dict[str, torch.Tensor], heads: int = 16) -> dict[str, Any]:
    """Our model spec (as a dict) from the shapes of a released state dict (already unwrapped)."""
    for key in sd:
        if not re.match(r"^stages\.\d+\.", key):
            raise UserError(f"released state dict: cannot place key {key!r} (every key of the released "
                            f"MRModel starts with 'stages.<i>.')")
    stages = _indices(iter(sd), r"^stages\.(\d+)\.")
    if stages != list(range(len(stages))):
        raise UserError(f"released state dict: stages {stages} are not numbered 0..{len(stages) - 1}")
    branches, norms, channels, classes, qkv_bias = [], set(), set(), set(), set()
    sides = []
    for i in stages:
        s = f"stages.{i}"
        conv = _need(sd, f"{s}.input_layer.1.weight", 4)
        width, in_ch, patch = conv.shape[0], conv.shape[1], conv.shape[2]
        if conv.shape[2] != conv.shape[3] or not patch:
            raise UserError(f"released state dict: {s}.input_layer.1.weight is not a square kernel "
                            f"{tuple(conv.shape)}")
        channels.add(in_ch)
        rows = _need(sd, f"{s}.input_layer.3.position_embeddings.weight", 2).shape[0]
        res = math.isqrt(rows)
        if not rows or res * res != rows:  # an empty table would divide the input size by 0 below
            raise UserError(f"released state dict: {s}.input_layer.3.position_embeddings.weight has {rows} "
                            f"rows, not a square grid")
        blocks = _indices((k for k in sd if k.startswith(f"{s}.blocks.")), rf"^{re.escape(s)}\.blocks\.(\d+)\.")
        n = len(blocks)
        if not n or blocks != list(range(n)) or n % 2 == 0:
            raise UserError(f"released state dict: {s} has blocks {blocks[:3]}..{blocks[-3:] if blocks else []}; "
                            f"expected an odd number numbered from 0 (in, middle and out blocks)")
        b0 = f"{s}.blocks.0"
        if f"{b0}.block1.query_key_value.weight" in sd:
            block = "transformer"
            qkv_bias.add(f"{b0}.block1.query_key_value.bias" in sd)
            if width % heads:
                raise UserError(f"{s}: width {width} is not divisible by --heads {heads}")
        elif f"{b0}.block1.1.weight" in sd:
            block = "convnext"
        else:
            found = sorted(k for k in sd if k.startswith(f"{b0}.block1."))
            raise UserError(f"released state dict: cannot tell the block type of {s} "
                            f"(neither block1.query_key_value nor block1.1; found {found[:4]})")
        if f"{b0}.block2.norm.scale.param0" in sd:
            norms.add("tdrmsnorm")
        elif f"{b0}.block2.norm.weight.param0" in sd:
            norms.add("tdln")
        elif f"{b0}.block2.norm.scale" in sd:
            norms.add("rmsnorm")
        else:
            found = sorted(k for k in sd if k.startswith(f"{b0}.block2.norm."))
            raise UserError(f"released state dict: unsupported block norm in {s} (found {found[:4] or 'none'}; "
                            f"known: TDRMSN, LN, RMSN)")
        hidden = _need(sd, f"{b0}.block2.w0.weight", 2).shape[0]
        branch = {"block": block, "width": int(width), "depth": n, "mlp_width": int(hidden), "patch": int(patch),
                  "out_kernel": int(_need(sd, f"{s}.output_layer.2.weight", 4).shape[-1])}
        if block == "transformer":
            branch["heads"] = heads
            if f"{s}.class_embeds.weight" not in sd:
                raise UserError(f"released state dict: Transformer stage {s} has no class_embeds "
                                f"(unconditional released models are not supported)")
            classes.add(int(sd[f"{s}.class_embeds.weight"].shape[0]) - 1)
        else:
            branch["kernel"] = int(sd[f"{b0}.block1.1.weight"].shape[-1])
        branches.append(branch)
        sides.append(res * patch)
    for name, values in (("input channels", channels), ("block norm", norms), ("class count", classes),
                         ("qkv bias", qkv_bias)):
        if len(values) > 1:
            raise UserError(f"released state dict: stages disagree on the {name}: {sorted(values)}")
    image_size = max(sides)
    for i, (b, side) in enumerate(zip(branches, sides)):
        if image_size % side:
            raise UserError(f"released state dict: stage {i} sees {side}x{side} (resolution x patch), which "
                            f"does not divide the input size {image_size}")
        b["downsample"] = image_size // side
    return {"name": "DiMR (released weights)", "in_channels": int(channels.pop()), "image_size": int(image_size),
            "num_classes": classes.pop() if classes else 1000, "conditioning": "norm", "norm": norms.pop(),
            "outer_norm": "tdln", "mlp": "glu", "attention_fp32": False, "pos_embed": "learned",
            "cascade": "dimr", "head": "conv", "long_skip": True,
            "qkv_bias": bool(qkv_bias.pop()) if qkv_bias else False, "branches": branches}


def _named_like_preset(spec: Any) -> str | None:
    """The preset name whose network is exactly this one, if any."""
    from dimr_lab.spec.model_spec import resolve_model
    from dimr_lab.spec.presets import PRESETS
    from dimr_lab.spec.schema import to_dict

    def key(s: Any) -> dict:
        d = to_dict(s)
        for k in ("name", "attention_fp32", "checkpointing", "attention"):
            d.pop(k, None)
        for b in d["branches"]:
            b["depth"] = b["depth"] // 2 * 2 + 1
            if b["block"] != "convnext":
                b.pop("kernel", None)
        return d

    mine = key(spec)
    for name, preset in PRESETS.items():
        try:
            if key(resolve_model({"preset": name})) == mine:
                return name
        except Exception:  # a preset that does not resolve is not ours to judge here
            continue
    return None


def convert_official_state_dict(sd: Any, heads: int = 16) -> tuple[Any, dict[str, torch.Tensor]]:
    """(ModelSpec, our state dict) from a released state dict (bare, wrapped, or with a 'module.' prefix).

    Every released tensor is used and every tensor of our network is filled, with matching shapes;
    otherwise a UserError names the key."""
    from dimr_lab.nn.network import build_model
    from dimr_lab.spec.model_spec import resolve_model
    from dimr_lab.spec.presets import PRESETS

    if heads < 1:
        raise UserError(f"--heads must be positive, got {heads}")
    sd = unwrap_state_dict(sd)
    spec = resolve_model(infer_spec_dict(sd, heads))
    preset = _named_like_preset(spec)
    if preset is not None:
        spec.name = PRESETS[preset].get("name", preset) + RELEASED_SUFFIX
    with torch.device("meta"):
        target = build_model(spec).state_dict()
    pairs = key_pairs(spec)
    ours: dict[str, torch.Tensor] = {}
    for off, mine in pairs:
        if off not in sd:
            raise UserError(f"released state dict: missing {off!r} (for our {mine!r})")
        if mine not in target:  # our network and the key table disagree: a bug here, not bad input
            raise UserError(f"internal: no tensor {mine!r} in our network for released {off!r}")
        if tuple(sd[off].shape) != tuple(target[mine].shape):
            raise UserError(f"released state dict: {off!r} has shape {tuple(sd[off].shape)}, the inferred "
                            f"architecture needs {tuple(target[mine].shape)} (for {mine!r})")
        ours[mine] = sd[off]
    used = {off for off, _ in pairs}
    extra = [k for k in sd if k not in used]
    if extra:
        raise UserError(f"released state dict: cannot place key {extra[0]!r}"
                        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    unfilled = [k for k in target if k not in ours]
    if unfilled:
        raise UserError(f"internal: our tensor {unfilled[0]!r} has no released counterpart")
    return spec, {k: ours[k] for k in target}


# ---------------------------------------------------------------------------------------------------
# ours -> released


def to_official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under the released code's names and layout (loads into its MRModel)."""
    spec = model.spec
    state = model.state_dict()
    pairs = key_pairs(spec)
    out = {}
    for off, mine in pairs:
        if mine not in state:
            raise UserError(f"our network has no tensor {mine!r} (for released {off!r})")
        out[off] = state[mine]
    left = [k for k in state if k not in {m for _, m in pairs}]
    if left:
        raise UserError(f"our tensor {left[0]!r} has no place in the released layout")
    return out


def official_config(spec: Any) -> dict[str, Any]:
    """The released MRModel's config (as plain dicts: top level and one per stage) for `spec`."""
    _check_representable(spec)
    norm = {"tdrmsnorm": "TDRMSN", "tdln": "LN", "rmsnorm": "RMSN"}[spec.norm]
    stages = []
    for b, res in zip(spec.branches, spec.resolutions()):
        stage = {"block_type": "TransformerBlock" if b.block == "transformer" else "ConvNeXtBlock",
                 "dim": b.width, "hidden_dim": b.mlp_width, "num_blocks": b.depth, "max_height": res,
                 "max_width": res, "image_input_ratio": b.downsample, "input_feature_ratio": b.patch,
                 "final_kernel_size": b.out_kernel, "dropout_prob": 0}
        if b.block == "transformer":
            stage["num_attention_heads"] = b.heads
        else:
            stage["kernel_size"] = b.kernel
        stages.append(stage)
    return {"channels": spec.in_channels, "num_classes": spec.num_classes + 1, "block_grad_to_lowres": False,
            "norm_type": norm, "stage_configs": stages}


# ---------------------------------------------------------------------------------------------------
# files


def load_official(src: str | Path, took: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A released checkpoint's state dict (loaded with weights_only=True); UserError if unreadable or if a
    tensor holds NaN or inf (a diverged or damaged file, which would convert and sample noise)."""
    from dimr_lab.nn.checkpoint import READABLE, load_file

    obj = load_file(src, what="released checkpoint")
    if isinstance(obj, dict) and obj.get("format") in READABLE:
        raise UserError(f"{src}: a dimr-lab checkpoint (format {obj['format']!r}), not a released one: there is "
                        f"nothing to convert; sample, evaluate or export it as it is")
    sd = unwrap_state_dict(obj, source=str(src), took=took)
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise UserError(f"{src}: tensor {bad!r} holds NaN or inf values; refusing to convert it")
    return sd


def convert_official(src: str | Path, dst: str | Path, heads: int = 16, *, force: bool = False) -> dict[str, Any]:
    """Convert a released checkpoint into ours (weights + resolved spec, atomically); returns a summary.
    An existing destination is refused unless `force`."""
    from dimr_lab.nn.checkpoint import write_checkpoint
    from dimr_lab.spec.preflight import check_out_file
    from dimr_lab.spec.schema import to_dict

    dst = Path(dst)
    if dst.is_dir():
        raise UserError(f"{dst}: is a directory; give the checkpoint's file name (e.g. {dst}/dimr_xl_2r.pt)")
    if dst.exists() and not force:
        raise UserError(f"{dst}: exists; refusing to overwrite it (use --force to replace it)")
    check_out_file(dst)
    took: list[str] = []
    sd = load_official(src, took)
    try:
        spec, state = convert_official_state_dict(sd, heads)
    except UserError as err:
        raise UserError(f"{src}: {err}") from None
    write_checkpoint(dst, {"model_spec": to_dict(spec), "model": state, "ema": None, "identity": None,
                           "source": {"kind": "released DiMR state dict", "path": str(src), "heads": heads,
                                      "key": ".".join(took)}})
    td = sum(v.numel() for k, v in state.items() if re.search(r"\.(p0|p1|w|b)$", k))
    return {"spec": spec, "params": sum(v.numel() for v in state.values()), "td_params": td,
            "tensors": len(state), "dst": str(dst), "key": ".".join(took)}
