"""timm ``ResNet`` (BasicBlock and Bottleneck, plain or deep stem, optional squeeze-excite).

Spaces per block: ``in`` (what ``conv1`` and the downsample read), ``mid`` (BasicBlock) or
``mid1`` / ``mid2`` (Bottleneck) for the channels between the convolutions, and ``out`` for the
block output, which the last convolution and BN, the shortcut (downsample conv + BN) and the
block's ReLU all write in the same channels. A block without a downsample adds its input to its
output, so its input is observed in ``out`` too. ``in`` is the previous block's ``out`` again, but
named by its own block: a deeper target's identity block may pair with a source block that
changes width, and its ``conv1`` delta must be read in that source block's input channels.
Stages pair block by block by relative position; the pooled features in the classifier's input
are the last ``out``.

BatchNorm outputs are never observed: the next in-place ReLU or residual add overwrites them
before the target's batch runs, so the stored source activation would no longer be the BN's
output. Convolution outputs, convolution inputs and block outputs are not overwritten. Grouped
convolutions (ResNeXt) and attention layers other than squeeze-excite are not described, so a
strict transport names them.
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

_BN = nn.modules.batchnorm._BatchNorm


def _conv(name: str, module: nn.Conv2d, role: str, block: BlockId | None, out: SpaceKey,
          inp: SpaceKey) -> list[ParamRole]:
    if module.groups != 1:
        return []  # a grouped convolution has no per-tap [out, in] matrix to transport
    return [ParamRole(r.name, r.role, block, "conv", out, inp) if r.rule == "linear" else r
            for r in linear_params(name, module, role, block, out, inp)]


class _Builder(LayoutBuilder):
    """The shared builder, plus a convolution followed by its BatchNorm."""

    def conv_bn(self, conv: str, module: nn.Conv2d, bn: str, bn_module: nn.Module, role: str,
                block: BlockId | None, out: SpaceKey, inp: SpaceKey) -> None:
        """A convolution into ``out`` and the BatchNorm after it."""
        self.params += _conv(conv, module, role, block, out, inp)
        self.params += norm_params(bn, f"{role}.bn", block, out, bn_module)
        self.observe(out, module.out_channels, Point(conv, "out", f"{role}_out", "channels"))


def _stem(b: _Builder, model: nn.Module) -> SpaceKey:
    """``conv1`` (one conv, or the deep stem's conv-BN-ReLU chain), ``bn1``, ReLU, pool."""
    stem = SpaceKey(None, "stem")
    if isinstance(model.conv1, nn.Sequential):
        layers = [(f"conv1.{i}", m) for i, m in enumerate(model.conv1)
                  if isinstance(m, (nn.Conv2d, _BN))]
    else:
        layers = [("conv1", model.conv1)]
    layers.append(("bn1", model.bn1))
    space = SpaceKey(None, "pixels")
    b.observe(space, layers[0][1].in_channels, Point(layers[0][0], "in", "pixels", "channels"))
    k = 0
    for (name, conv), (bn_name, bn) in zip(layers[::2], layers[1::2]):
        out = stem if bn_name == "bn1" else SpaceKey(None, f"stem{k}")
        b.conv_bn(name, conv, bn_name, bn, f"stem.conv{k}", None, out, space)
        if out != stem:
            nxt = layers[2 * k + 2][0]
            b.observe(out, conv.out_channels, Point(nxt, "in", "next_in", "channels"))
        space, k = out, k + 1
    b.observe(stem, model.bn1.num_features, Point("act1", "out", "act", "channels"),
              Point("maxpool", "out", "pool", "channels"))
    return stem


def _se(b: _Builder, prefix: str, bid: BlockId, se: nn.Module, out: SpaceKey) -> None:
    """Squeeze-excite: pooled ``out`` -> hidden -> a per-channel gate in ``out``'s channels."""
    hidden = SpaceKey(bid, "se_hidden")
    b.params += _conv(f"{prefix}.se.fc1", se.fc1, "se.fc1", bid, hidden, out)
    b.params += _conv(f"{prefix}.se.fc2", se.fc2, "se.fc2", bid, out, hidden)
    if isinstance(se.bn, _BN):
        b.params += norm_params(f"{prefix}.se.bn", "se.bn", bid, hidden, se.bn)
    # fc1's output is overwritten by the in-place ReLU; fc2's input is that ReLU's output.
    b.observe(hidden, se.fc1.out_channels, Point(f"{prefix}.se.fc2", "in", "fc2_in", "channels"))
    b.observe(out, se.fc2.out_channels, Point(f"{prefix}.se.fc1", "in", "se_in", "channels"),
              Point(f"{prefix}.se.fc2", "out", "se_gate", "channels"))


def _block(b: _Builder, prefix: str, bid: BlockId, block: nn.Module) -> SpaceKey:
    out = SpaceKey(bid, "out")
    bottleneck = hasattr(block, "conv3")
    convs = ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2")
    mids = ("mid1", "mid2") if bottleneck else ("mid",)
    last = getattr(block, convs[-1])
    inp = SpaceKey(bid, "in")
    b.observe(inp, block.conv1.in_channels, Point(f"{prefix}.conv1", "in", "block_in", "channels"))
    if block.downsample is None:  # the identity shortcut adds the input to the output
        b.observe(out, last.out_channels, Point(f"{prefix}.conv1", "in", "block_in", "channels"))
    else:
        ds = [(f"{prefix}.downsample.{i}", m) for i, m in enumerate(block.downsample)
              if isinstance(m, (nn.Conv2d, _BN))]
        (conv_name, conv), (bn_name, bn) = ds
        b.conv_bn(conv_name, conv, bn_name, bn, "downsample", bid, out, inp)
        b.observe(out, last.out_channels,
                  Point(f"{prefix}.downsample", "out", "shortcut", "channels"))
    spaces = (inp, *(SpaceKey(bid, m) for m in mids), out)
    for i, name in enumerate(convs):
        conv = getattr(block, name)
        b.conv_bn(f"{prefix}.{name}", conv, f"{prefix}.bn{i + 1}", getattr(block, f"bn{i + 1}"),
                  name, bid, spaces[i + 1], spaces[i])
        if i > 0:
            b.observe(spaces[i], conv.in_channels,
                      Point(f"{prefix}.{name}", "in", f"{name}_in", "channels"))
    if getattr(block, "se", None) is not None and hasattr(block.se, "fc1"):
        _se(b, prefix, bid, block.se, out)
    b.observe(out, last.out_channels, Point(prefix, "out", "block_out", "channels"))
    return out


def describe(model: nn.Module) -> ModelLayout:
    layers = [getattr(model, f"layer{i + 1}") for i in range(4) if hasattr(model, f"layer{i + 1}")]
    stages = tuple(tuple(BlockId(s, i) for i in range(len(layer))) for s, layer in
                   enumerate(layers))
    b = _Builder()
    stream = _stem(b, model)
    for s, layer in enumerate(layers):
        for bid, block in zip(stages[s], layer):
            stream = _block(b, f"layer{s + 1}.{bid.index}", bid, block)
    if isinstance(model.fc, nn.Linear) and model.fc.in_features == b.widths[stream]:
        b.observe(stream, model.fc.in_features, Point("fc", "in", "head_in"))
        b.params.append(ParamRole("fc.weight", "head.weight", None, "head", None, stream))
        if model.fc.bias is not None:
            b.params.append(ParamRole("fc.bias", "head.bias", None, "head_bias"))
    return ModelLayout("timm_resnet", stages, b.spaces(), tuple(b.params))


FAMILY = Family("timm_resnet", instance_of("timm.models.resnet", "ResNet"), describe,
                priority=10)
