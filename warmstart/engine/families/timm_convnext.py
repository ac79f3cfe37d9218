"""timm ``ConvNeXt``: a patch (or overlapping) stem, four stages of residual blocks, a pooled head.

A block is ``conv_dw`` (depthwise 7x7) -> LayerNorm -> MLP (1x1 convolutions on [B, C, H, W] when
``conv_mlp``, else ``nn.Linear`` on the channels-last [B, H, W, C] map) -> layer scale ``gamma`` ->
plus the block input. Spaces per block: ``resid`` (the residual stream: block input and output,
the depthwise conv's input and output, the normalised and the MLP's output, all the same
channels) and ``mlp_hidden``. The stem writes into the first block's stream; a stage's
downsample (LayerNorm2d + strided conv) reads the previous stage's last stream and writes the
stage's first; the head norm and classifier read the last stream.

Channels-last blocks declare their MLP points with layout ``last`` on [B, H, W, C] maps; the
engine's row pairing does not accept those yet, so only ``conv_mlp`` models transport today.
"""

from __future__ import annotations

from torch import nn

from .base import (
    BlockId,
    Family,
    LayoutBuilder,
    ModelLayout,
    ParamRole,
    Point,
    SpaceKey,
    instance_of,
    linear_params,
    norm_params,
)


def _weights(name: str, module: nn.Module, role: str, block: BlockId | None, out: SpaceKey,
             inp: SpaceKey) -> list[ParamRole]:
    """A convolution moves by the per-tap rule, an ``nn.Linear`` by the linear rule."""
    roles = linear_params(name, module, role, block, out, inp)
    if isinstance(module, nn.Linear):
        return roles
    return [ParamRole(r.name, r.role, block, "conv", out, inp) if r.rule == "linear" else r
            for r in roles]


def _stem(b: LayoutBuilder, stem: nn.Sequential, out: SpaceKey) -> None:
    """Convolutions chain pixels -> (intermediate) -> ``out``; the closing norm acts on ``out``."""
    convs = [(f"stem.{i}", m) for i, m in enumerate(stem) if isinstance(m, nn.Conv2d)]
    space = SpaceKey(None, "pixels")
    b.observe(space, convs[0][1].in_channels, Point(convs[0][0], "in", "pixels", "channels"))
    for k, (name, conv) in enumerate(convs):
        nxt = out if k == len(convs) - 1 else SpaceKey(None, f"stem{k}")
        b.params += _weights(name, conv, f"stem.conv{k}", None, nxt, space)
        b.observe(nxt, conv.out_channels, Point(name, "out", f"stem_conv{k}", "channels"))
        if nxt != out:
            b.observe(nxt, conv.out_channels, Point(convs[k + 1][0], "in", "next_in", "channels"))
        space = nxt
    for i, m in enumerate(stem):
        if not isinstance(m, nn.Conv2d) and any(True for _ in m.parameters()):
            b.params += norm_params(f"stem.{i}", "stem.norm", None, out, m)
            b.observe(out, convs[-1][1].out_channels,
                      Point(f"stem.{i}", "out", "stem_norm", "channels"))


def _block(b: LayoutBuilder, prefix: str, bid: BlockId, block: nn.Module) -> None:
    resid, hidden = SpaceKey(bid, "resid"), SpaceKey(bid, "mlp_hidden")
    width = block.conv_dw.out_channels
    # Linear MLPs see the channels-last map: features on the last dimension.
    mlp = "channels" if block.use_conv_mlp else "last"
    b.observe(resid, width,
              Point(f"{prefix}.conv_dw", "in", "block_in", "channels"),
              Point(f"{prefix}.conv_dw", "out", "dw_out", "channels"),
              Point(f"{prefix}.norm", "out", "norm_out", mlp),
              Point(f"{prefix}.mlp.fc2", "out", "mlp_out", mlp),
              Point(prefix, "out", "block_out", "channels"))
    b.params.append(ParamRole(f"{prefix}.conv_dw.weight", "dw.weight", bid, "depthwise", resid,
                              resid))
    if block.conv_dw.bias is not None:
        b.params.append(ParamRole(f"{prefix}.conv_dw.bias", "dw.bias", bid, "vector", resid))
    b.params += norm_params(f"{prefix}.norm", "norm", bid, resid, block.norm)
    fc1, fc2 = block.mlp.fc1, block.mlp.fc2
    d_hidden = fc1.out_features if isinstance(fc1, nn.Linear) else fc1.out_channels
    b.observe(hidden, d_hidden, Point(f"{prefix}.mlp.fc1", "out", "fc1_out", mlp),
              Point(f"{prefix}.mlp.fc2", "in", "fc2_in", mlp))
    b.params += _weights(f"{prefix}.mlp.fc1", fc1, "mlp.fc1", bid, hidden, resid)
    b.params += _weights(f"{prefix}.mlp.fc2", fc2, "mlp.fc2", bid, resid, hidden)
    for name in ("norm", "grn"):  # a hidden-layer norm; ConvNeXt-V2's global response norm
        norm = getattr(block.mlp, name, None)
        if getattr(norm, "weight", None) is not None:
            b.params += norm_params(f"{prefix}.mlp.{name}", f"mlp.{name}", bid, hidden, norm)
    if block.gamma is not None:
        b.params.append(ParamRole(f"{prefix}.gamma", "ls.gamma", bid, "gain", resid))


def _head(b: LayoutBuilder, model: nn.Module, last: SpaceKey, width: int) -> None:
    """Norm(s) on the last stream, an optional hidden layer, then the task head."""
    if any(True for _ in model.norm_pre.parameters()):
        b.params += norm_params("norm_pre", "norm_pre", None, last, model.norm_pre)
        b.observe(last, width, Point("norm_pre", "out", "norm_pre", "channels"))
    head = model.head
    norm = getattr(head, "norm", None)
    if norm is not None and any(True for _ in norm.parameters()):
        b.params += norm_params("head.norm", "head.norm", None, last, norm)
        b.observe(last, width, Point("head.norm", "out", "head_norm", "channels"))
    feature = last
    pre_fc = getattr(getattr(head, "pre_logits", None), "fc", None)
    if isinstance(pre_fc, nn.Linear):
        feature = SpaceKey(None, "head_hidden")
        b.params += _weights("head.pre_logits.fc", pre_fc, "head.pre_logits", None, feature, last)
        b.observe(feature, pre_fc.out_features, Point("head.pre_logits.fc", "out", "pre_logits"))
    if isinstance(head.fc, nn.Linear):
        b.observe(feature, head.fc.in_features, Point("head.fc", "in", "head_in"))
        b.params.append(ParamRole("head.fc.weight", "head.weight", None, "head", None, feature))
        if head.fc.bias is not None:
            b.params.append(ParamRole("head.fc.bias", "head.bias", None, "head_bias"))


def describe(model: nn.Module) -> ModelLayout:
    stages = tuple(tuple(BlockId(s, i) for i in range(len(stage.blocks)))
                   for s, stage in enumerate(model.stages))
    b = LayoutBuilder()
    first_ds = isinstance(model.stages[0].downsample, nn.Sequential)
    stream = SpaceKey(None, "stem") if first_ds else SpaceKey(stages[0][0], "resid")
    _stem(b, model.stem, stream)
    for s, stage in enumerate(model.stages):
        ds = stage.downsample
        if isinstance(ds, nn.Sequential):  # LayerNorm2d on the previous stream, strided conv
            norm, conv = ds[0], ds[1]
            b.params += norm_params(f"stages.{s}.downsample.0", f"stages.{s}.downsample.norm",
                                    None, stream, norm)
            b.observe(stream, conv.in_channels,
                      Point(f"stages.{s}.downsample.0", "out", f"ds{s}_norm", "channels"))
            b.params += _weights(f"stages.{s}.downsample.1", conv, f"stages.{s}.downsample.conv",
                                 None, SpaceKey(stages[s][0], "resid"), stream)
        for bid, block in zip(stages[s], stage.blocks):
            _block(b, f"stages.{s}.blocks.{bid.index}", bid, block)
            stream = SpaceKey(bid, "resid")
    _head(b, model, stream, model.num_features)
    return ModelLayout("timm_convnext", stages, b.spaces(), tuple(b.params))


FAMILY = Family("timm_convnext", instance_of("timm.models.convnext", "ConvNeXt"), describe,
                priority=10)
