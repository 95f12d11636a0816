"""The multi-resolution network (DiMR Sec. 3.2) built from a ModelSpec; U-ViT and DiT are one-branch cases.

Branches run lowest resolution first and each sees the whole noisy input. A branch patchifies the
input, adds its position code and the cascade from the branch below, runs its blocks with U-ViT long
skips, and predicts noise at its own resolution. `model(x, t, y)` returns every branch's prediction.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dimr_lab.errors import UserError
from dimr_lab.nn.time_dependent import Cond, TimeDependentParameter, collect, evaluate_all, localize, time_to_tau
from dimr_lab.registry import BLOCKS, CASCADES, CONDITIONING, HEADS, POS_EMBEDS
from dimr_lab.spec.model_spec import ModelSpec, resolve_model


class Branch(nn.Module):
    """One resolution: patchify -> (+ cascade) -> blocks with long skips -> head."""

    def __init__(self, spec: ModelSpec, index: int, resolution: int, lower_feature_dim: int | None, ratio: int):
        super().__init__()
        b = spec.branches[index]
        self.downsample, self.width = b.downsample, b.width
        self.uses_attention = BLOCKS.meta(b.block, "uses_attention")
        cond_dim = spec.time_embed_dim or spec.branches[0].width
        self.patch_embed = nn.Conv2d(spec.in_channels, b.width, b.patch, stride=b.patch)
        self.pos_embed = POS_EMBEDS.get(spec.pos_embed)(resolution, resolution, b.width)
        self.cascade = None
        if lower_feature_dim is not None and CASCADES.meta(spec.cascade, "uses_features"):
            self.cascade = CASCADES.get(spec.cascade)(spec, lower_feature_dim, b.width, ratio, cond_dim)
        n = b.depth // 2 * 2 + 1 if spec.long_skip else b.depth  # in, middle, out blocks (U-ViT)
        self.blocks = nn.ModuleList([BLOCKS.get(b.block)(spec, b) for _ in range(n)])
        self.skip_proj = nn.ModuleList([nn.Linear(2 * b.width, b.width) for _ in range(n // 2)]
                                       if spec.long_skip else [])
        self.head = HEADS.get(spec.head)(spec, b, cond_dim)
        self.feature_dim = (n + 1) * b.width  # what the cascade hands to the next branch
        self.checkpointing = spec.checkpointing

    def _run(self, block: nn.Module, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        cond = cond.window(block.td_slots)  # the block's own TD tensors, numbered as in every block of its kind
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, cond, use_reentrant=False)
        return block(x, cond)

    def forward(self, images: torch.Tensor, cond: Cond, lower: torch.Tensor | None,
                tokens: torch.Tensor | None, keep_features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = images
        if self.downsample > 1:
            x = F.interpolate(x, size=(x.shape[2] // self.downsample, x.shape[3] // self.downsample), mode="area")
        # channels-last in memory, not just in shape: a permuted NCHW tensor would keep every op of the branch
        # (the depthwise convolutions above all) on strided channels-first data
        x = self.pos_embed(self.patch_embed(x).permute(0, 2, 3, 1).contiguous())  # (B, h, w, d)
        if self.cascade is not None and lower is not None:
            x = x + self.cascade(lower, cond)
        B, h, w, d = x.shape
        extra = 0
        if self.uses_attention:
            x = x.reshape(B, h * w, d)  # (B, N, d)
            if tokens is not None:
                extra = tokens.shape[1]
                x = torch.cat([tokens.to(x.dtype), x], dim=1)  # (B, extra + N, d)
        features = [x] if keep_features else None

        n = len(self.blocks)
        skips = []
        for i, block in enumerate(self.blocks):
            if self.skip_proj and i > n // 2:  # out blocks take the matching in block's output (LIFO)
                x = self.skip_proj[i - n // 2 - 1](torch.cat([x, skips.pop()], dim=-1))
            x = self._run(block, x, cond)
            if self.skip_proj and i < n // 2:
                skips.append(x)
            if features is not None:
                features.append(x)

        def grid(z: torch.Tensor) -> torch.Tensor:
            return z[:, extra:].reshape(B, h, w, d) if self.uses_attention else z

        out = self.head(grid(x), cond)
        lower_next = torch.cat([grid(f) for f in features], dim=-1) if features is not None else None
        return out, lower_next  # (B, C, h', w'), (B, h, w, (n+1) d)


class MultiResolutionNet(nn.Module):
    """DiMR's multi-resolution diffusion network; `forward(x, t, y)` -> per-branch noise, lowest first."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.null_label = spec.num_classes
        dims = [b.width for b in spec.branches]
        attention = [BLOCKS.meta(b.block, "uses_attention") for b in spec.branches]
        self.conditioning = CONDITIONING.get(spec.conditioning)(
            spec.num_classes, dims, attention, spec.time_embed_dim or dims[0])
        res = spec.resolutions()
        self.branches = nn.ModuleList()
        lower = None
        for i in range(len(spec.branches)):
            branch = Branch(spec, i, res[i], lower, res[i] // res[i - 1] if i else 1)
            self.branches.append(branch)
            lower = branch.feature_dim
        self.apply(_init_weights)
        self._td = collect(self)
        for branch in self.branches:
            for block in branch.blocks:
                block.td_slots = localize(block)

    def compile_blocks(self, **kwargs: Any) -> None:
        """Regional compilation, what `train.compile` does on every device: torch.compile each block in place.
        Blocks of one kind and shape share one compiled graph, so compile time grows with the kinds of blocks,
        not the depth. On the CPU it also trains DiMR-tiny as fast as the whole network compiled, which took
        three times as long to compile (BENCHMARKS.md); the ConvNeXt depthwise convolutions stay opaque
        operators there (nn/depthwise.py)."""
        for branch in self.branches:
            for block in branch.blocks:
                block.compile(**kwargs)

    def set_checkpointing(self, enabled: bool) -> None:
        """Activation checkpointing of every block: less memory, one more forward in backward."""
        self.spec.checkpointing = enabled
        for branch in self.branches:
            branch.checkpointing = enabled

    def _check_inputs(self, x: Any, t: Any, y: Any, tau: Any) -> tuple[torch.Tensor, ...]:
        """x, t (B,), y (B,) and tau (B,) or (1,) as forward uses them; a call the network cannot take is one
        UserError saying what it expects (rather than an error from deep inside a layer)."""
        s = self.spec
        if not torch.is_tensor(x) or x.dim() != 4 or x.shape[1] != s.in_channels \
                or tuple(x.shape[2:]) != (s.image_size, s.image_size):
            got = f"{tuple(x.shape)}" if torch.is_tensor(x) else f"a {type(x).__name__}"
            raise UserError(f"{s.name}: x must be (B, {s.in_channels}, {s.image_size}, {s.image_size}) "
                            f"(model.in_channels, model.image_size), got {got}")
        weight = self.branches[0].patch_embed.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise UserError(f"{s.name}: x is {x.dtype} but the network's weights are {weight.dtype}: pass "
                            f"x.to({weight.dtype}) (or run under torch.autocast)")
        B = x.shape[0]

        def per_sample(v: Any, what: str) -> torch.Tensor:
            v = torch.as_tensor(v, device=x.device)
            if v.numel() not in (1, B) or (v.dim() > 1 and v.numel() != max(v.shape)):
                raise UserError(f"{s.name}: {what} must be a scalar or hold one value per sample (B = {B}), "
                                f"got shape {tuple(v.shape)}")
            if not (v.dtype.is_floating_point or v.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
                raise UserError(f"{s.name}: {what} must be a number, got {v.dtype}")
            return v.reshape(-1)

        t = per_sample(t, "t").to(torch.float32).expand(B)
        if y is None:
            y = torch.full((B,), self.null_label, dtype=torch.long, device=x.device)
        else:
            y = per_sample(y, "y")
            if y.dtype.is_floating_point:
                raise UserError(f"{s.name}: y must hold integer labels, got {y.dtype}")
            y = y.long().expand(B)
            # looked for on the CPU only, as tau below: reading labels back from a GPU would stall the host
            if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > self.null_label):
                raise UserError(f"{s.name}: labels must lie in 0..{s.num_classes - 1}, or {self.null_label} "
                                f"(null_label, for guidance); got {int(y.min())}..{int(y.max())}")
        tau = time_to_tau(t) if tau is None else per_sample(tau, "tau").to(torch.float32)  # (B,) or (1,)
        return x, t, y, tau

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, y: torch.Tensor | None = None,
                tau: torch.Tensor | None = None) -> list[torch.Tensor]:
        """x (B, C, H, W) at model.image_size in the weights' dtype, t (B,) or a scalar in [0, 1] (time tokens
        and adaLN embed 1000 t), y (B,) labels or one label for the batch (null_label for guidance; None: all
        null), tau (B,) or a scalar: what TD tensors read (default tau = 2t - 1, the released latent path);
        -> every branch's noise prediction, lowest resolution first. A call it cannot take is a UserError."""
        x, t, y, tau = self._check_inputs(x, t, y, tau)
        # one time for the whole batch (a sampler's step): TD tensors evaluated once and broadcast. Looked for
        # on the CPU only: reading the answer back from a GPU would stall the host every step (training
        # times differ per image anyway), and per-image TD values are the same numbers
        if tau.numel() > 1 and tau.device.type == "cpu" and not torch.compiler.is_compiling() \
                and bool((tau == tau[0]).all()):
            tau = tau[:1]
        cond = Cond(t=t, tau=tau, y=y, td=evaluate_all(self._td, tau), vector=self.conditioning.vector(t, y))
        outputs, lower = [], None
        last = len(self.branches) - 1
        for i, branch in enumerate(self.branches):
            keep = i < last and self.branches[i + 1].cascade is not None
            out, lower = branch(x, cond, lower, self.conditioning.tokens(i, t, y), keep)
            outputs.append(out)
        return outputs  # [(B, C, s_k, s_k)], lowest resolution first


def _init_weights(m: nn.Module) -> None:
    # Linear and Embedding: truncated normal std 0.02, zero bias (released code); convs: PyTorch default
    if isinstance(m, nn.Linear) and not getattr(m, "skip_init", False):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.trunc_normal_(m.weight, std=0.02)


def _reinit(m: nn.Module) -> None:
    """A module's own initialisation as the network gives it: its construction-time init, then _init_weights."""
    m.reset_parameters()
    _init_weights(m)


def build_model(spec: Any, *, init_draws: str = "stream", seed: int = 0) -> MultiResolutionNet:
    """A network from a ModelSpec, a spec dict (optionally with `preset`), a preset name or a TOML path.
    `init_draws` (train.init_draws): "stream" draws the initial weights from the global torch generator in
    construction order; "by_name" draws each random tensor from its own generator keyed by (seed, its
    qualified name) (nn/init_draws.py), after building under the global stream as "stream" does."""
    spec = resolve_model(spec)
    if init_draws == "stream":
        return MultiResolutionNet(spec)
    if init_draws != "by_name":
        raise ValueError(f"init_draws must be 'stream' or 'by_name', got {init_draws!r}")
    from dimr_lab.nn.init_draws import build_by_name

    return build_by_name(lambda: MultiResolutionNet(spec), seed, _reinit)


def optimizer_param_groups(model: nn.Module, weight_decay: float, no_decay: str = "td_norms_biases") -> list[dict]:
    """AdamW groups. 'td_norms_biases': TD w/b, norm parameters, biases, embeddings decay-free;
    'td_only': only TD w/b decay-free (as the released DiMR code); 'none': everything decays (U-ViT)."""
    free_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, TimeDependentParameter):
            free_ids |= {id(module.w), id(module.b)}
    if no_decay == "td_norms_biases":
        from dimr_lab.nn.norms import Norm

        for name, module in model.named_modules():
            if isinstance(module, (Norm, nn.LayerNorm, nn.Embedding)) and not isinstance(module, nn.Linear):
                own = [p for n, p in module.named_parameters() if "modulation" not in n]
                free_ids |= {id(p) for p in own}
        for name, p in model.named_parameters():
            if name.endswith(".bias") and p.dim() == 1:
                free_ids.add(id(p))
    elif no_decay == "none":  # U-ViT decays every parameter
        free_ids = set()
    elif no_decay != "td_only":
        raise ValueError(f"no_decay must be 'td_norms_biases', 'td_only' or 'none', got {no_decay!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if id(p) not in free_ids]
    free = [p for p in params if id(p) in free_ids]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": free, "weight_decay": 0.0}]
