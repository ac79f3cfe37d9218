"""timm ``EfficientNet`` (incl. the Lite variants): stages of depthwise-separable and inverted
residual blocks, with BatchNorm and optional squeeze-excite.

Per block: ``in`` (the block input), ``expanded`` (the channels the depthwise conv works on; a
depthwise conv keeps coordinates, so its input and output share the space), ``se_hidden`` and
``out`` (projection output and block output). Stages pair block by block by relative position.
"""

from __future__ import annotations

from torch import nn

from .base import (
    BlockId,
    Family,
    ModelLayout,
    ParamRole,
    Point,
    Space,
    SpaceKey,
    instance_of,
    linear_params,
    norm_params,
)


def _conv(name: str, module: nn.Module, role: str, block, out_space, in_space) -> list[ParamRole]:
    roles = linear_params(name, module, role, block, out_space, in_space)
    return [r if r.rule != "linear" else ParamRole(r.name, r.role, block, "conv", out_space,
                                                   in_space) for r in roles]


def _block(prefix: str, bid: BlockId, block: nn.Module) -> tuple[list[Space], list[ParamRole]]:
    inverted = hasattr(block, "conv_pwl")
    keys = {n: SpaceKey(bid, n) for n in ("in", "expanded", "se_hidden", "out")}
    proj = "conv_pwl" if inverted else "conv_pw"
    proj_norm = "bn3" if inverted else "bn2"
    expanded_points = [
        Point(f"{prefix}.conv_dw", "in", "dw_in", "channels"),
        Point(f"{prefix}.conv_dw", "out", "dw_out", "channels"),
        Point(f"{prefix}.{proj}", "in", "proj_in", "channels"),
    ]
    params: list[ParamRole] = []
    spaces: list[Space] = []
    width = block.conv_dw.in_channels
    if inverted:
        spaces.append(Space(keys["in"], block.conv_pw.in_channels,
                            (Point(f"{prefix}.conv_pw", "in", "block_in", "channels"),)))
        expanded_points.insert(0, Point(f"{prefix}.conv_pw", "out", "expand_out", "channels"))
        params += _conv(f"{prefix}.conv_pw", block.conv_pw, "pw", bid, keys["expanded"], keys["in"])
        params += norm_params(f"{prefix}.bn1", "bn_expand", bid, keys["expanded"], block.bn1)
    dw_norm = "bn2" if inverted else "bn1"
    params.append(ParamRole(f"{prefix}.conv_dw.weight", "dw.weight", bid, "depthwise",
                            keys["expanded"], keys["expanded"]))
    params += norm_params(f"{prefix}.{dw_norm}", "bn_dw", bid, keys["expanded"],
                          getattr(block, dw_norm))
    se = getattr(block, "se", None)
    if se is not None and hasattr(se, "conv_reduce"):
        expanded_points.append(Point(f"{prefix}.se.conv_expand", "out", "se_gate", "channels"))
        spaces.append(Space(keys["se_hidden"], se.conv_reduce.out_channels, (
            Point(f"{prefix}.se.conv_reduce", "out", "reduce_out", "channels"),
            Point(f"{prefix}.se.conv_expand", "in", "expand_in", "channels"),
        )))
        params += _conv(f"{prefix}.se.conv_reduce", se.conv_reduce, "se.reduce", bid,
                        keys["se_hidden"], keys["expanded"])
        params += _conv(f"{prefix}.se.conv_expand", se.conv_expand, "se.expand", bid,
                        keys["expanded"], keys["se_hidden"])
    spaces.append(Space(keys["expanded"], width, tuple(expanded_points)))
    spaces.append(Space(keys["out"], getattr(block, proj).out_channels, (
        Point(f"{prefix}.{proj}", "out", "proj_out", "channels"),
        Point(prefix, "out", "block_out", "channels"),
    )))
    params += _conv(f"{prefix}.{proj}", getattr(block, proj), "pwl", bid, keys["out"],
                    keys["expanded"])
    params += norm_params(f"{prefix}.{proj_norm}", "bn_proj", bid, keys["out"],
                          getattr(block, proj_norm))
    return spaces, params


def describe(model: nn.Module) -> ModelLayout:
    stages = tuple(tuple(BlockId(s, i) for i in range(len(stage)))
                   for s, stage in enumerate(model.blocks))
    pixels, stem, head = SpaceKey(None, "pixels"), SpaceKey(None, "stem"), SpaceKey(None, "head")
    spaces = [
        Space(pixels, model.conv_stem.in_channels,
              (Point("conv_stem", "in", "pixels", "channels"),)),
        Space(stem, model.conv_stem.out_channels,
              (Point("conv_stem", "out", "conv", "channels"),
               Point("bn1", "out", "bn", "channels"))),
    ]
    params = _conv("conv_stem", model.conv_stem, "stem", None, stem, pixels)
    params += norm_params("bn1", "stem.bn", None, stem, model.bn1)
    for stage in stages:
        for bid in stage:
            block_spaces, block_params = _block(f"blocks.{bid.stage}.{bid.index}", bid,
                                                model.blocks[bid.stage][bid.index])
            spaces += block_spaces
            params += block_params
    last_out = SpaceKey(stages[-1][-1], "out")
    head_points = [Point("conv_head", "out", "conv", "channels"),
                   Point("bn2", "out", "bn", "channels")]
    if isinstance(model.classifier, nn.Linear):
        head_points.append(Point("classifier", "in", "head_in"))
        params.append(ParamRole("classifier.weight", "head.weight", None, "head", None, head))
        params.append(ParamRole("classifier.bias", "head.bias", None, "head_bias"))
    spaces.append(Space(head, model.conv_head.out_channels, tuple(head_points)))
    params += _conv("conv_head", model.conv_head, "head_conv", None, head, last_out)
    params += norm_params("bn2", "head.bn", None, head, model.bn2)
    return ModelLayout("timm_efficientnet", stages, tuple(spaces), tuple(params))


FAMILY = Family("timm_efficientnet", instance_of("timm.models.efficientnet", "EfficientNet"),
                describe, priority=10)
