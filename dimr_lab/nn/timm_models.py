"""Every preset in timm's registry: `import dimr_lab.nn.timm_models` then `timm.create_model("dimr_xl_2r")`.

Keyword arguments to create_model override model-spec keys (`timm.create_model("dimr_tiny_2r",
num_classes=10)`); timm's `pretrained` is refused (no hub weights: use `dimr_lab.load_model`).
"""

from __future__ import annotations

from typing import Any, Callable

from timm.models import register_model

from dimr_lab.spec.presets import PRESETS


def _factory(name: str) -> Callable[..., Any]:
    def create(pretrained: bool = False, **kwargs: Any) -> Any:
        from dimr_lab.errors import UserError
        from dimr_lab.nn.network import build_model

        if pretrained:
            raise UserError(f"{name}: no pretrained weights in timm's hub; use dimr_lab.load_model(PATH)")
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return build_model({"preset": name, **kwargs})

    create.__name__ = name
    create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"{PRESETS[name].get('name', name)} from dimr-lab's presets."
    return create


for _name in PRESETS:
    globals()[_name] = register_model(_factory(_name))
