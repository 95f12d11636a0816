"""Initial weights drawn by parameter name (`train.init_draws = "by_name"`).

Under "stream" (the default) a network is built under the global torch generator, seeded `train.seed`:
every random initialisation draws the next numbers of one stream in construction order, so a module
one variant adds shifts the draws of every module built after it, and the diffusion noise (a generator
seeded `train.seed` too) repeats those numbers.

Under "by_name" the network is first built the same way, under the global stream (so the global
generator ends where it ends today, for whatever draws from it next), while a dispatch mode follows
every tensor operation of the construction: which tensors hold numbers that depend on a random draw,
and by which sequence of operations (with their arguments) each got its final value. Then every module
with such a parameter or buffer runs its own initialisation again, `reset_parameters()` followed by
the network's `_init_weights`, where each random operation writing into one of the module's own
tensors draws from that tensor's own generator, seeded by `name_seed(seed, qualified name)`. Only the
tensors whose construction-time value was random take the new value; the others are put back. Checks:

- a random tensor of a module without `reset_parameters`, or a random draw during the re-run into a
  tensor that is not the module's own, is an error (it cannot be drawn by name);
- the re-run must give each random tensor its value by the same operations with the same arguments as
  the construction did (e.g. kaiming-uniform bounds, trunc-normal std 0.02): else a parent changed a
  child's initialisation in a way the re-run does not repeat, and that is an error too.

So each parameter keeps its distribution, and its numbers depend only on (seed, its name, its own
shape and init): two networks built with one seed give the same initial values to every tensor they
share by name whose module is built alike (a convolution's bias bound depends on its weight's fan-in).
Python's and numpy's generators are not followed; no module of dimr-lab draws from them.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from dimr_lab.errors import SpecError

_OVERWRITES = {"aten::fill_", "aten::zero_", "aten::copy_"}  # in-place ops whose result ignores self


class InitDrawsError(SpecError, RuntimeError):
    """A network 'by_name' cannot draw again: one line naming train.init_draws and the tensor (exit 2 in the CLI),
    a RuntimeError for callers of build_model."""

    def __init__(self, message: str):
        super().__init__(f"'by_name' cannot draw this network's initial weights: {message}; allowed: 'stream' "
                         f"(the default), or 'by_name' once the module initialises its tensors in "
                         f"reset_parameters()", key="train.init_draws")


def name_seed(seed: int, name: str) -> int:
    """The 32-bit seed of the tensor `name` of a run seeded `seed` (torch's CPU generator keeps a seed's low
    32 bits): the first four bytes of a SHA-256, well mixed in both."""
    digest = hashlib.sha256(f"dimr-lab init_draws by_name\0{int(seed)}\0{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _key(t: torch.Tensor) -> int | None:
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return t.untyped_storage().data_ptr()


def _whole(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and t.is_contiguous() and t.numel() * t.element_size() == t.untyped_storage().nbytes()


def _record(func: Any, args: tuple, kwargs: dict) -> tuple:
    """An operation with its non-tensor arguments (a generator left out): what decides a draw's distribution."""
    plain = [a for a in pytree.tree_leaves((args, {k: v for k, v in kwargs.items() if k != "generator"}))
             if not isinstance(a, (torch.Tensor, torch.Generator))]
    return (str(func), repr(plain))


class _Follow(TorchDispatchMode):
    """Follows which storages hold numbers that depend on a random draw, and the operations that gave them
    their values (`history`: storage -> tuple of records, absent when deterministic). With `generators` set
    (storage -> Generator), random operations writing into those storages draw from them; a random operation
    writing anywhere else is refused."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[int, tuple] = {}
        self.generators: dict[int, torch.Generator] | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        schema = func._schema
        written = [a for arg, a in zip(schema.arguments, args) if arg.alias_info is not None and arg.alias_info.is_write
                   and isinstance(a, torch.Tensor)]
        written += [kwargs[arg.name] for arg in schema.arguments if arg.kwarg_only and arg.alias_info is not None
                    and arg.alias_info.is_write and isinstance(kwargs.get(arg.name), torch.Tensor)]
        random = torch.Tag.nondeterministic_seeded in func.tags
        rec = _record(func, args, kwargs)
        if random and self.generators is not None:
            keys = {_key(w) for w in written} - {None}
            if not written or not keys <= self.generators.keys() or len({id(self.generators[k]) for k in keys}) != 1:
                raise InitDrawsError(f"{func} draws into a tensor that is not one of the re-initialised "
                                     f"module's own parameters or buffers")
            if any(a.name == "generator" for a in schema.arguments):
                kwargs["generator"] = self.generators[keys.pop()]
            else:
                raise InitDrawsError(f"{func} takes no generator")
        out = func(*args, **kwargs)
        overwrite = schema.name in _OVERWRITES
        read = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)
                and not (overwrite and schema.name != "aten::copy_" and any(a is w for w in written))
                and not (schema.name == "aten::copy_" and a is args[0])]
        past = tuple(r for a in read if (k := _key(a)) is not None for r in self.history.get(k, ()))
        if written:
            for w in written:
                k = _key(w)
                if k is None:
                    continue
                if random:
                    self.history[k] = (rec,)
                elif past:
                    self.history[k] = past + (rec,)
                elif overwrite and _whole(w):
                    self.history.pop(k, None)
                elif k in self.history:  # a partial overwrite or an op reading self
                    self.history[k] = self.history[k] + (rec,)
            return out
        inputs = {_key(a) for a in read}
        for o in pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor) and (k := _key(o)) is not None and k not in inputs:
                if random or past:
                    self.history[k] = past + (rec,)
                else:
                    self.history.pop(k, None)  # a new tensor (possibly where a freed random one lay)
        return out


def _ops(history: tuple | None) -> str:
    """The operations of a history, on one line: 'aten::uniform_([-0.5, 0.5]) then aten::mul_(...)'."""
    return " then ".join(f"{op}({args[1:-1]})" for op, args in history or ()) or "no random draw"


def _own(m: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(m.named_parameters(recurse=False)), **dict(m.named_buffers(recurse=False))}


def build_by_name(construct: Callable[[], nn.Module], seed: int, reinit: Callable[[nn.Module], None]) -> nn.Module:
    """`construct()` under the global stream, then every randomly initialised tensor drawn again from its own
    generator keyed by (seed, its qualified name) by `reinit(module)`, the module's own initialisation."""
    mode = _Follow()
    with mode:
        model = construct()
    todo = []
    for mname, m in model.named_modules():
        own = _own(m)
        drawn = {n: mode.history[k] for n, t in own.items() if (k := _key(t)) is not None and k in mode.history}
        if drawn:
            todo.append((mname, m, own, drawn))
    for mname, m, own, drawn in todo:
        where = (mname + ".") if mname else ""
        if not callable(getattr(m, "reset_parameters", None)):
            raise InitDrawsError(f"{where}{next(iter(drawn))} ({type(m).__name__}) is initialised randomly but "
                                 f"its module has no reset_parameters() to draw it again")
        with torch.no_grad():
            saved = {n: t.detach().clone() for n, t in own.items()}
            mode.generators = {_key(t): torch.Generator().manual_seed(name_seed(seed, where + n))
                               for n, t in own.items() if _key(t) is not None}
            for k in mode.generators:
                mode.history.pop(k, None)
            try:
                with mode:
                    reinit(m)
            finally:
                mode.generators = None
            for n, t in own.items():
                if n not in drawn:
                    t.copy_(saved[n])
                elif mode.history.get(_key(t)) != drawn[n]:
                    raise InitDrawsError(f"re-running {type(m).__name__}'s initialisation does not give {where}{n} "
                                         f"its value as the construction did (a parent module changed it?): "
                                         f"{_ops(drawn[n])} vs {_ops(mode.history.get(_key(t)))}")
    return model
