"""Checkpoints: the one reader and writer of torch files (weights_only=True on every load).

Format "dimr-lab/2": {"format", "model_spec": resolved dict, "model": state_dict, "ema": state_dict|None,
"identity": the run's identity hash or None (a converted or exported network)}; a training checkpoint
adds optimizer, scaler, step, rng, data_position, elapsed_s, world_size. "dimr-lab/1" files (no
identity) still load. A checkpoint that names another run's identity is refused by that run.
"""

from __future__ import annotations

import errno
import pickle
from pathlib import Path
from typing import Any

import torch

from dimr_lab.atomic import atomic_write
from dimr_lab.errors import SpecError, UserError

FORMAT = "dimr-lab/2"
READABLE = ("dimr-lab/1", FORMAT)
TRAINING_KEYS = ("optimizer", "step", "rng", "data_position")


def load_file(path: str | Path, *, what: str = "checkpoint") -> Any:
    """torch.load(path, weights_only=True) on the CPU; a missing, truncated or foreign file (or one that
    would need unpickling code) is one UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {what}" + (" (a directory)" if path.is_dir() else ""))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refused, truncated zip, not a torch file, I/O errors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if "Weights only load failed" in first or isinstance(err, (EOFError, pickle.UnpicklingError)):
            first = "not a complete torch file loadable with weights_only=True"  # torch's own text spans a page
        raise UserError(f"{path}: corrupt or unreadable {what} ({type(err).__name__}: {first[:200]})") from None


def save_file(obj: Any, path: str | Path, *, what: str = "checkpoint") -> None:
    """torch.save atomically (the old file or the new one, never half); a full or read-only disk is one
    UserError, with the previous file intact and no temporary left behind."""
    existed = Path(path).exists()
    kept = "the previous one is intact" if existed else "nothing was written"
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except OSError as err:
        reason = "no space left on the device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise UserError(f"{path}: cannot write the {what} ({reason}); {kept}") from None
    except RuntimeError as err:  # torch wraps write failures of its zip writer
        if "No space left" in str(err) or "file write failed" in str(err):
            raise UserError(f"{path}: cannot write the {what} (no space left on the device?); {kept}") from None
        raise


def read_checkpoint(path: str | Path, *, identity: str | None = None, model_spec: dict[str, Any] | None = None,
                    training: bool = False) -> dict[str, Any]:
    """A checkpoint dict, checked: format, keys (training ones when `training`), the run it belongs to
    (`identity`) and the model spec; any problem is a UserError naming the file."""
    path = Path(path)
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE or "model" not in ckpt \
            or "model_spec" not in ckpt:
        raise UserError(f"{path}: not a dimr-lab checkpoint (expected format {FORMAT!r} with model and model_spec; "
                        f"released DiMR weights convert with `dimr-lab convert-official`)")
    step = ckpt.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"{path}: corrupt checkpoint (its step is {step!r}, not a step number)")
    if training:
        missing = [k for k in ("ema", *TRAINING_KEYS) if k not in ckpt]
        if missing:
            raise UserError(f"{path}: not a training checkpoint (lacks {', '.join(missing)})")
    held = ckpt.get("identity")
    if identity is not None and held is not None and held != identity:
        raise UserError(f"{path}: checkpoint of another run (identity {held}, this run is {identity}); "
                        f"move it away or use another folder")
    if model_spec is not None and ckpt["model_spec"] != model_spec:
        raise UserError(f"{path}: checkpoint was written for a different model spec than this run's")
    return ckpt


def write_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint dict (adds the format tag)."""
    save_file({"format": FORMAT, **payload}, path)


def model_payload(model: torch.nn.Module, *, ema: torch.nn.Module | None = None,
                  identity: str | None = None, **extra: Any) -> dict[str, Any]:
    """What a model checkpoint holds: the resolved spec, the weights, optionally the EMA weights."""
    from dimr_lab.spec.schema import to_dict

    return {"model_spec": to_dict(model.spec), "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None, "identity": identity, **extra}


def weights_mismatch(model: torch.nn.Module, state: Any) -> str:
    """What keeps `state` from loading into `model`, naming the tensors ('' when nothing does)."""
    if not isinstance(state, dict):
        return f"expected a dict of tensors, got {type(state).__name__}"
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} is {tuple(v.shape)} where the network has {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    odd = [k for k, v in state.items() if k in own and not isinstance(v, torch.Tensor)]

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    parts = ([f"missing {some(missing)}"] if missing else []) + ([f"unexpected {some(extra)}"] if extra else []) \
        + shapes[:2] + ([f"not tensors: {some(odd)}"] if odd else [])
    return "; ".join(parts)


def load_weights(model: torch.nn.Module, state: dict[str, Any], path: str | Path) -> None:
    """load_state_dict with a one-line UserError naming the tensors that do not fit the network."""
    why = weights_mismatch(model, state)
    if not why:
        try:
            model.load_state_dict(state)
            return
        except (RuntimeError, KeyError, TypeError) as err:
            why = str(err).splitlines()[0][:200]
    raise UserError(f"{path}: weights do not fit the model spec ({why})")


SAFETENSORS_FORMAT = "dimr-lab/2 safetensors"


def export_safetensors(path: str | Path, model_spec: dict[str, Any], state: dict[str, torch.Tensor],
                       **meta: Any) -> None:
    """Weights as safetensors (no pickle at all), with the resolved model spec and `meta` as metadata."""
    import json

    from safetensors.torch import save as st_save

    from dimr_lab.atomic import atomic_write

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"format": SAFETENSORS_FORMAT, "model_spec": json.dumps(model_spec, sort_keys=True),
                **{k: json.dumps(v) for k, v in meta.items()}}
    try:
        atomic_write(path, lambda f: f.write(st_save(tensors, metadata=metadata)))
    except OSError as err:
        raise UserError(f"{path}: cannot write the export ({err.strerror or err})") from None


def read_safetensors(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata with model_spec parsed, tensors) of a dimr-lab safetensors export; UserError otherwise."""
    import json

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # truncated or foreign files
        raise UserError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0][:200]})") from None
    if meta.get("format") != SAFETENSORS_FORMAT or "model_spec" not in meta:
        raise UserError(f"{path}: not a dimr-lab export (its metadata has no model spec)")
    try:
        meta = {k: json.loads(v) if k != "format" else v for k, v in meta.items()}
    except ValueError:
        raise UserError(f"{path}: its metadata is not JSON") from None
    return meta, tensors


def _looks_like_safetensors(path: str | Path) -> bool:
    """A safetensors file by its content, whatever its name: an 8-byte header length, then a JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000


def load_model(path: str | Path, *, ema: bool = True) -> torch.nn.Module:
    """The network of a checkpoint (with its EMA weights when present and `ema` is set) or of a safetensors
    export (the weights it holds)."""
    from dimr_lab.nn.network import build_model
    from dimr_lab.spec.model_spec import resolve_model

    def stored_spec(data: Any) -> Any:
        # the resolved spec as a table, never a file name or preset to look up from wherever this runs
        if not isinstance(data, dict):
            raise UserError(f"{path}: its model spec is not a table (a {type(data).__name__})")
        try:
            return resolve_model(data, file=str(path), key="model_spec")
        except SpecError as err:
            raise UserError(f"{path}: its model spec is invalid: {err}") from None

    if str(path).endswith(".safetensors") or _looks_like_safetensors(path):
        meta, tensors = read_safetensors(path)
        model = build_model(stored_spec(meta["model_spec"]))
        load_weights(model, tensors, path)
        return model.eval()
    ckpt = read_checkpoint(path)
    model = build_model(stored_spec(ckpt["model_spec"]))
    load_weights(model, ckpt["ema"] if ema and ckpt.get("ema") else ckpt["model"], path)
    return model.eval()
