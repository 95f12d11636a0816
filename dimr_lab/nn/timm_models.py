"""Every preset in timm's registry: `import dimr_lab.nn.timm_models` then `timm.create_model("dimr_xl_2r")`.

Keyword arguments to create_model override model-spec keys (`timm.create_model("dimr_tiny_2r",
num_classes=10)`). Weights from a local file, never a hub:

    timm.create_model("dimr_tiny_3r", pretrained=True, pretrained_cfg_overlay=dict(file="run/checkpoints/last.pt"))
    timm.create_model("dimr_tiny_3r", checkpoint_path="export.safetensors")   # timm's own loader

With `pretrained=True` the network is the file's own (its recorded spec, overrides included; EMA weights of a
training checkpoint), and a file that records another network (another preset's name) is refused with one
line. `checkpoint_path` loads a state dict into the preset's network through timm's own loader (a dimr-lab
export holds the EMA weights; a training checkpoint gives timm its raw 'model' weights); a file that does not
fit fails there with timm's and torch's errors: `pretrained=True` gives dimr-lab's one-line ones.
"""

from __future__ import annotations

from typing import Any, Callable

from timm.models import register_model

from dimr_lab.spec.presets import PRESETS


def _weights_file(pretrained_cfg: Any, overlay: Any) -> str | None:
    for cfg in (overlay, pretrained_cfg):
        if isinstance(cfg, dict) and cfg.get("file"):
            return str(cfg["file"])
        file = getattr(cfg, "file", None)
        if file:
            return str(file)
    return None


def _factory(name: str) -> Callable[..., Any]:
    def create(pretrained: bool = False, **kwargs: Any) -> Any:
        from dimr_lab.errors import UserError
        from dimr_lab.nn.network import build_model

        pretrained_cfg, overlay = kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None)
        kwargs.pop("cache_dir", None)
        if pretrained:
            file = _weights_file(pretrained_cfg, overlay)
            if file is None:
                raise UserError(f"{name}: no weights in timm's hub; give a local checkpoint or export with "
                                f"pretrained_cfg_overlay=dict(file=PATH) (or checkpoint_path=PATH)")
            if kwargs:
                raise UserError(f"{name}: pretrained=True builds the file's own network; drop {sorted(kwargs)}")
            from dimr_lab.nn.checkpoint import load_model
            from dimr_lab.nn.official import RELEASED_SUFFIX

            model = load_model(file)
            want = PRESETS[name].get("name", name)
            held = model.spec.name.removesuffix(RELEASED_SUFFIX)  # convert-official's file of this preset is one
            if held != want:  # another network's file: never hand it back under this name
                same = [n for n, p in PRESETS.items() if p.get("name", n) == held]
                how = f"timm.create_model({same[0]!r}, ...)" if same else "dimr_lab.load_model(PATH)"
                raise UserError(f"{file}: holds a {model.spec.name} network, not {want} ({name}); load it with {how}")
            return model
        return build_model({"preset": name, **kwargs})

    create.__name__ = name
    create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"{PRESETS[name].get('name', name)} from dimr-lab's presets."
    return create


for _name in PRESETS:
    globals()[_name] = register_model(_factory(_name))
