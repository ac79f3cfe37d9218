"""Fallback for two models whose module names are identical and only widths differ.

Every ``nn.Linear`` / ``nn.Conv*`` gets its own input and output spaces, every norm layer its output
space; no coordinates are assumed to be shared between layers, since the fallback cannot know which
functions between them are elementwise. The task head is timm's ``get_classifier()``, a top-level
``head``/``classifier``/``fc``/``score`` linear layer, or else the last layer when it is linear (an
``nn.Sequential`` MLP's output layer).
"""

from __future__ import annotations

from torch import nn

from .base import (
    Family,
    ModelLayout,
    ParamRole,
    Point,
    Space,
    SpaceKey,
    find_head,
    join,
    last_linear,
)

_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def _layout(module: nn.Module) -> str:
    return "channels" if isinstance(module, nn.modules.conv._ConvNd) else "last"


def _width(module: nn.Module, side: str) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features if side == "in" else module.out_features
    return module.in_channels if side == "in" else module.out_channels


def describe(model: nn.Module) -> ModelLayout:
    spaces: list[Space] = []
    params: list[ParamRole] = []
    head = find_head(model, "") or last_linear(model)
    for name, module in model.named_modules():
        layout = _layout(module)
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            depthwise = getattr(module, "groups", 1) > 1
            if depthwise and module.groups != module.in_channels:
                continue  # grouped convolutions stay uncovered: the strict check reports them
            k_in, k_out = SpaceKey(None, f"{name}:in"), SpaceKey(None, f"{name}:out")
            if depthwise:
                k_in = k_out
                spaces.append(Space(k_out, module.out_channels, (
                    Point(name, "in", "in", layout), Point(name, "out", "out", layout))))
                params.append(ParamRole(join(name, "weight"), join(name, "weight"), None,
                                        "depthwise", k_out, k_out))
            elif head is not None and name == head[0]:
                spaces.append(Space(k_in, module.in_features, (Point(name, "in", "in"),)))
                params.append(ParamRole(join(name, "weight"), "head.weight", None, "head", None,
                                        k_in))
                if module.bias is not None:
                    params.append(ParamRole(join(name, "bias"), "head.bias", None, "head_bias"))
                continue
            else:
                rule = "linear" if isinstance(module, nn.Linear) else "conv"
                spaces.append(Space(k_in, _width(module, "in"), (Point(name, "in", "in", layout),)))
                spaces.append(Space(k_out, _width(module, "out"),
                                    (Point(name, "out", "out", layout),)))
                params.append(ParamRole(join(name, "weight"), join(name, "weight"), None, rule,
                                        k_out, k_in))
            if module.bias is not None:
                params.append(ParamRole(join(name, "bias"), join(name, "bias"), None, "vector",
                                        k_out))
        elif isinstance(module, _NORMS):
            key = SpaceKey(None, f"{name}:out")
            width = getattr(module, "num_features", None) or getattr(module, "num_channels", None)
            if width is None:
                width = module.normalized_shape[-1]
            spaces.append(Space(key, width, (Point(name, "out", "out", layout_of_norm(module)),)))
            for attr, rule in (("weight", "gain"), ("bias", "vector")):
                if getattr(module, attr, None) is not None:
                    params.append(ParamRole(join(name, attr), join(name, attr), None, rule, key))
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                params.append(ParamRole(join(name, "running_mean"), join(name, "running_mean"),
                                        None, "vector", key))
                params.append(ParamRole(join(name, "running_var"), join(name, "running_var"),
                                        None, "variance", key))
        elif isinstance(module, nn.Embedding):
            params.append(ParamRole(join(name, "weight"), join(name, "weight"), None, "embedding"))
    return ModelLayout("generic", ((),), tuple(spaces), tuple(params))


def layout_of_norm(module: nn.Module) -> str:
    return "channels" if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) \
        else "last"


FAMILY = Family("generic", lambda model: True, describe, priority=-100)
