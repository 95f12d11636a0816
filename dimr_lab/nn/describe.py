"""Parameters and MACs of a network, per branch and in total, counted on the built model.

Parameters follow the paper's convention, which is just the element count here: a time-dependent
tensor holds four tensors (p0, p1, w, b), so it counts 4x. MACs are one forward pass, batch 1, as
torch.utils.flop_counter sees it (linear, conv and attention matmuls; norms and activations are not
counted), halved from FLOPs. The counter has no formula for the CPU flash-attention kernel (it reports
zero for it); `_register_cpu_sdpa` adds the one it uses for the other SDPA kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import flop_counter

from dimr_lab.nn.network import MultiResolutionNet, build_model
from dimr_lab.spec.model_spec import ModelSpec, resolve_model

_registered = False


def _register_cpu_sdpa() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    aten = torch.ops.aten
    missing = [op for op in (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None),)
               if op is not None and op not in flop_counter.flop_registry]
    if missing:
        @flop_counter.register_flop_formula(missing)
        def _cpu_flash_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    missing_bwd = [op for op in (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None),)
                   if op is not None and op not in flop_counter.flop_registry]
    if missing_bwd:
        @flop_counter.register_flop_formula(missing_bwd)
        def _cpu_flash_bwd_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def count_macs(model: MultiResolutionNet, *, device: str | torch.device = "meta", batch: int = 1) -> dict[str, Any]:
    """MACs of one forward at `batch` (total and per branch), from the flop counter."""
    _register_cpu_sdpa()
    spec = model.spec
    x = torch.randn(batch, spec.in_channels, spec.image_size, spec.image_size, device=device)
    t = torch.full((batch,), 0.5, device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    counter = flop_counter.FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, y)
    per_module = counter.get_flop_counts()
    total = counter.get_total_flops() / 2
    branches = []
    for i in range(len(model.branches)):
        key = f"MultiResolutionNet.branches.{i}"
        flops = sum(per_module.get(key, {}).values())
        branches.append(flops / 2)
    return {"macs": total, "branch_macs": branches}


def count(spec: Any, *, device: str = "meta") -> dict[str, Any]:
    """{'params', 'gmacs', 'branches': [...], ...} of a model spec (built on the meta device: no memory)."""
    spec = spec if isinstance(spec, ModelSpec) else resolve_model(spec)
    with torch.device(device):
        model = build_model(spec)
    macs = count_macs(model, device=device)
    rows = []
    for i, (b, res) in enumerate(zip(spec.branches, spec.resolutions())):
        params = sum(p.numel() for p in model.branches[i].parameters())
        rows.append({"branch": i, "block": b.block, "width": b.width, "blocks": len(model.branches[i].blocks),
                     "tokens": f"{res}x{res}", "patch": b.patch, "params": params,
                     "gmacs": macs["branch_macs"][i] / 1e9})
    total = sum(p.numel() for p in model.parameters())
    td = sum(p.p0.numel() * 4 for p in model._td)
    shared = total - sum(r["params"] for r in rows)
    return {"name": spec.name, "params": total, "gmacs": macs["macs"] / 1e9, "td_params": td,
            "shared_params": shared, "branches": rows, "output_sizes": spec.output_sizes()}


def counts_for(model: Any) -> dict[str, Any]:
    """The count of a network: remembered (dimr_lab.spec.counts), or counted now and remembered."""
    from dimr_lab.spec.counts import FIELDS, lookup, remember

    found = lookup(model)
    if found is not None:
        return found
    info = {k: v for k, v in count(model).items() if k in FIELDS}
    remember(model, info)
    return info
