"""The model spec: a list of branches (lowest resolution first) plus global component choices.

    [model]
    preset = "dimr_xl_2r"        # optional: start from a preset, then override any key below
    in_channels = 4
    image_size = 32
    norm = "tdrmsnorm"           # inside blocks
    [[model.branches]]
    block = "transformer"
    width = 960
    ...

Names of components are checked against the registries (`dimr-lab components`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from dimr_lab.errors import SpecError, unknown_name_message
from dimr_lab.registry import ATTENTION, BLOCKS, CASCADES, CONDITIONING, HEADS, MLPS, NORMS, POS_EMBEDS
from dimr_lab.spec.schema import field, from_dict, load_toml, to_dict


# Upper bounds of the sizes a spec may ask for: far above any network trained here (the largest preset has
# width 1152, depth 57), and low enough that counting a network on the meta device (check_memory, describe,
# run's plan) neither overflows torch's storage size nor builds blocks for hours before it is refused.
MAX_WIDTH = 1 << 20
MAX_DEPTH = 1024
MAX_SIDE = 8192
MAX_KERNEL = 255
MAX_CHANNELS = 4096
MAX_CLASSES = 1_000_000

@dataclass
class BranchSpec:
    block: str = field("transformer", choices=BLOCKS)
    width: int = field(256, min=1, max=MAX_WIDTH)
    depth: int = field(4, min=1, max=MAX_DEPTH, help="blocks as the released configs count them (num_blocks); "
                                                     "with long skips the branch builds depth//2*2+1 (in, middle, out)")
    heads: int = field(0, min=0, max=MAX_WIDTH, help="attention heads (attention blocks); 0 = width // 64")
    mlp_width: int = field(0, min=0, max=4 * MAX_WIDTH,
                           help="hidden width of the MLP/GLU; 0 = 4*width (mlp) or 2*width (glu)")
    patch: int = field(1, min=1, max=MAX_SIDE, help="patchify kernel = stride")
    downsample: int = field(1, min=1, max=MAX_SIDE, help="area down-sampling of the input before patchify")
    kernel: int = field(7, min=1, max=MAX_KERNEL, help="depthwise kernel of convnext blocks (odd)")
    out_kernel: int = field(3, min=1, max=MAX_KERNEL, help="kernel of the output conv (odd; heads 'conv' and "
                                                                "'unpatchify_conv': 'unpatchify' has none)")

    def validate(self) -> None:
        if self.kernel % 2 == 0:
            raise SpecError(f"must be odd, got {self.kernel}", key="kernel")
        if self.out_kernel % 2 == 0:
            raise SpecError(f"must be odd, got {self.out_kernel}", key="out_kernel")
        if self.heads and self.width % self.heads:
            raise SpecError(f"width {self.width} is not divisible by heads {self.heads}", key="heads")


@dataclass
class ModelSpec:
    name: str = field("custom", help="a label; presets set their own")
    in_channels: int = field(3, min=1, max=MAX_CHANNELS)
    out_channels: int = field(0, min=0, max=2 * MAX_CHANNELS,
                              help="0 = in_channels; 2x (a learned variance, as DiT's) builds for describe and bench, "
                                   "training takes in_channels")
    image_size: int = field(32, min=1, max=MAX_SIDE, help="side of the input (pixels or latents)")
    num_classes: int = field(1000, min=0, max=MAX_CLASSES,
                             help="class labels 0..num_classes-1; num_classes is the null label")
    conditioning: str = field("norm", choices=CONDITIONING)
    norm: str = field("tdrmsnorm", choices=NORMS, help="norm inside every block")
    outer_norm: str = field("tdln", choices=NORMS, help="norm of the cascade and the output heads")
    mlp: str = field("glu", choices=MLPS)
    attention: str = field("sdpa", choices=ATTENTION)
    attention_fp32: bool = field(False, help="attend in float32 under autocast (a stability option, slower); "
                                                     "the released code's .float() before SDPA does not do this: "
                                                     "autocast casts SDPA's inputs back to the autocast dtype")
    pos_embed: str = field("learned", choices=POS_EMBEDS)
    cascade: str = field("dimr", choices=CASCADES)
    head: str = field("conv", choices=HEADS)
    long_skip: bool = field(True, help="U-ViT long skips (in/middle/out blocks)")
    qkv_bias: bool = field(False)
    time_embed_dim: int = field(0, min=0, max=MAX_WIDTH, help="adaln conditioning and adaLN norms: width of the "
                                                              "time+class condition vector; 0 = the first branch's "
                                                              "width")
    checkpointing: bool = field(False, help="activation checkpointing of every block (saves memory, costs time)")
    branches: list[BranchSpec] = field(default_factory=lambda: [BranchSpec()])

    def validate(self) -> None:
        """Raise a SpecError for a network that cannot be built; changes nothing."""
        if not self.branches:
            raise SpecError("needs at least one branch", key="branches")
        res = []
        for i, b in enumerate(self.branches):
            side = self.image_size // b.downsample
            if self.image_size % b.downsample or side % b.patch:
                raise SpecError(f"image_size {self.image_size} is not divisible by downsample {b.downsample} "
                                f"x patch {b.patch}", key=f"branches[{i}]")
            res.append(side // b.patch)
            multiple = POS_EMBEDS.meta(self.pos_embed, "width_multiple")
            if b.width % multiple:
                raise SpecError(f"position embedding {self.pos_embed!r} needs every branch width divisible by "
                                f"{multiple}, got {b.width}", key=f"branches[{i}].width")
        for i in range(1, len(res)):
            if res[i] % res[i - 1] or res[i] <= res[i - 1]:
                raise SpecError(f"branch resolutions must grow by an integer ratio, lowest first; got {res}",
                                key=f"branches[{i}]")
        inner, outer = NORMS.meta(self.norm, "condition"), NORMS.meta(self.outer_norm, "condition")
        provides_vector = CONDITIONING.meta(self.conditioning, "vector")
        if "vector" in (inner, outer) and not provides_vector:
            raise SpecError(f"norm {self.norm!r}/{self.outer_norm!r} needs a condition vector: "
                            f"set conditioning = 'adaln'", key="conditioning")
        if NORMS.meta(self.outer_norm, "gated"):
            # the cascade and the heads have no residual branch to gate: the gate's weights would never learn
            raise SpecError(f"norm {self.outer_norm!r} gates a residual branch, and the cascade and the heads have "
                            f"none; use one without a gate (adaln, as DiT's final layer)", key="outer_norm")
        if provides_vector and inner != "vector":
            raise SpecError(f"conditioning {self.conditioning!r} needs an adaLN norm in the blocks "
                            f"(adaln, adaln_zero), got {self.norm!r}", key="norm")
        if self.conditioning == "norm" and "time" not in (inner, outer):
            raise SpecError(f"conditioning 'norm' reads time through time-dependent norms, but norm "
                            f"{self.norm!r} and outer_norm {self.outer_norm!r} are not (use tdln or tdrmsnorm, "
                            f"or conditioning 'token')", key="conditioning")
        if self.conditioning in ("norm", "token") and not any(BLOCKS.meta(b.block, "uses_attention")
                                                              for b in self.branches):
            # class (and, as tokens, time) enter as tokens of attention branches: without one the network
            # would never see the label (guidance a no-op at twice the cost), and with 'token' and plain
            # norms not the time either
            missing = [w for w, gone in (("the class label", self.num_classes > 0),
                                         ("the time", self.conditioning == "token" and "time" not in (inner, outer)))
                       if gone]
            if missing:
                raise SpecError(f"conditioning {self.conditioning!r} gives {' and '.join(missing)} to attention "
                                f"branches as tokens, and no branch attends (a 'transformer' block in one "
                                f"branch, or conditioning 'adaln')", key="conditioning")

    def resolve(self) -> "ModelSpec":
        """A copy with every default filled in (heads, MLP widths, out_channels): what the network builds.
        Resolving a resolved spec changes nothing, so its dict hashes stably."""
        out = copy.deepcopy(self)
        for b in out.branches:
            if BLOCKS.meta(b.block, "uses_attention") and not b.heads:
                b.heads = _default_heads(b.width)
            if not b.mlp_width:
                b.mlp_width = MLPS.meta(out.mlp, "default_ratio") * b.width
        if not out.out_channels:
            out.out_channels = out.in_channels
        return out

    def unresolved(self) -> dict[str, Any]:
        """This resolved spec as data with each value resolve() would derive as it is (a branch's heads and MLP
        width, out_channels) left to derive (0), so that an override of what it derives from (mlp, a branch's
        width or block, in_channels) derives it again, as on the spec the network was resolved from (a value
        set to what it would derive anyway is read as derived)."""
        data = to_dict(self)
        for b, raw in zip(self.branches, data["branches"]):
            if BLOCKS.meta(b.block, "uses_attention") and b.heads == _default_heads(b.width):
                raw["heads"] = 0
            if b.mlp_width == MLPS.meta(self.mlp, "default_ratio") * b.width:
                raw["mlp_width"] = 0
        if self.out_channels == self.in_channels:
            data["out_channels"] = 0
        return data

    def resolutions(self) -> list[int]:
        """Token grid side of each branch, lowest first."""
        return [self.image_size // b.downsample // b.patch for b in self.branches]

    def output_sizes(self) -> list[int]:
        """Side of each branch's noise prediction."""
        out = []
        for b, r in zip(self.branches, self.resolutions()):
            out.append(r * b.patch if HEADS.meta(self.head, "unpatchify") else r)
        return out


def _default_heads(width: int) -> int:
    """Attention heads of a branch that sets none: one per 64 channels, down to a divisor of the width."""
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads


def resolve_model(data: "dict[str, Any] | str | ModelSpec", *, file: str | None = None, key: str = "",
                  overrides: list[tuple[str, Any]] | None = None) -> ModelSpec:
    """A resolved ModelSpec from a dict (with an optional `preset`), a preset name, a TOML path or a
    ModelSpec, with dotted overrides (`branches.0.depth`) applied on top: an error in the base names its
    file, one the overrides bring in names `--set`."""
    from dimr_lab.spec.schema import set_dotted

    raw, file, where = _raw_model(data, file, key)
    spec = _build(raw, file, where)
    if overrides:
        raw = copy.deepcopy(raw)
        for dotted, value in overrides:
            set_dotted(raw, dotted.removeprefix("model."), value, file="--set")
        spec = _build(raw, "--set", key)
    return spec


def _raw_model(data: Any, file: str | None, key: str) -> tuple[dict[str, Any], str | None, str]:
    """(the model table as plain data, the file it came from, the key its errors are named under)."""
    from dimr_lab.spec.presets import PRESETS

    if isinstance(data, ModelSpec):
        data = to_dict(data)
    if isinstance(data, str):
        if data in PRESETS:
            data = {"preset": data}
        elif data.endswith(".toml"):
            file = data
            raw = load_toml(data)
            if "ablation" in raw or "variant" in raw:
                raise SpecError("an ablation file, not a model: `dimr-lab describe FILE --variant NAME [--profile "
                                "P]` describes one variant's network, `dimr-lab run FILE --dry-run` lists them all",
                                file=file)
            if "model" in raw:  # a [model] table: its keys are model.KEY in errors
                key = key or "model"
            data = raw.get("model", raw)
            if not data:
                raise SpecError("no model in it: expected a [model] table (or model keys at the top level)",
                                file=file)
        else:
            raise SpecError(unknown_name_message("model preset", data, PRESETS) + " (or a .toml path)",
                            file=file, key=key or None)
    if not isinstance(data, dict):
        raise SpecError(f"expected a table or a preset name, got {data!r}", file=file, key=key or None)
    return copy.deepcopy(data), file, key


def _build(data: dict[str, Any], file: str | None, key: str) -> ModelSpec:
    """Merge a preset with the table's own keys, validate, resolve."""
    from dimr_lab.spec.presets import PRESETS

    data = copy.deepcopy(data)
    preset = data.pop("preset", None)
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise SpecError(unknown_name_message("model preset", str(preset), PRESETS),
                            file=file, key=f"{key}.preset" if key else "preset")
        merged = copy.deepcopy(PRESETS[preset])
        user_branches = data.pop("branches", None)
        merged.update(data)
        if isinstance(user_branches, list) and len(user_branches) == len(merged["branches"]) \
                and all(isinstance(b, dict) for b in user_branches):
            merged["branches"] = [{**base, **b} for base, b in zip(merged["branches"], user_branches)]
        elif user_branches is not None:
            merged["branches"] = user_branches
        data = merged
    branches = data.get("branches")
    if isinstance(branches, dict):  # {"1": {"block": ...}}: dotted overrides (branches.1.block) of a preset
        where = f"{key}.branches" if key else "branches"
        if preset is None:
            raise SpecError("per-branch overrides (branches.N.KEY) need a preset to apply to", file=file, key=where)
        merged_branches = copy.deepcopy(PRESETS[preset]["branches"])
        for index, patch in branches.items():
            if not (isinstance(index, str) and index.isdigit() and int(index) < len(merged_branches)):
                raise SpecError(f"{index!r} is not a branch index of preset {preset!r} "
                                f"(0..{len(merged_branches) - 1})", file=file, key=f"{where}.{index}")
            if not isinstance(patch, dict):
                raise SpecError(f"expected a table, got {patch!r}", file=file, key=f"{where}.{index}")
            merged_branches[int(index)].update(patch)
        data["branches"] = merged_branches
    return from_dict(ModelSpec, data, file=file, prefix=key).resolve()


def parse_model(value: Any, file: str | None, key: str) -> ModelSpec:
    """The `model` field of a run spec: a table (with an optional preset) or a preset name."""
    return resolve_model(value, file=file, key=key)
