"""timm ConvNeXt and ResNet families on tiny random-init models.

Exactness tests build the target from the source through a known embedding of every coordinate
space (the maps the transport should recover), check that the target computes the source's
function, and then that after transporting a fine-tune it computes the fine-tuned source's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Hashable

import pytest
import timm
import torch
from torch import Tensor, nn

from warmstart.engine.families import describe_model
from warmstart.engine.families.base import BlockId, ModelLayout, SpaceKey
from warmstart.engine.transport import transport

N_CLASSES = 3


# ---------------------------------------------------------------------------------------------
# models


def _exercised(model: nn.Module, seed: int, size: int = 32) -> nn.Module:
    """Weights of unit gain (pre-activations of order one, so GELU and ReLU act nonlinearly and
    every hidden direction is reached), gains and layer scales near 1 (timm zero-initialises a
    ResNet block's last BN gain and starts ConvNeXt layer scales at 1e-6), non-zero shifts, and
    BN running statistics of the data (so no ReLU channel is dead). Eval mode after."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("gamma") or name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(0.1 * noise)
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if not norms:
            return model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        model.train()
        for x in images(32, size, seed=seed + 100):
            model(x)
        for m in norms:
            m.momentum = 0.1
    return model.eval()


def convnext(dims, depths, seed: int = 0, **kwargs) -> nn.Module:
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=N_CLASSES,
                              dims=dims, depths=depths, **kwargs)
    return _exercised(model, seed)


def resnet(channels, layers, seed: int = 0, bottleneck: bool = False, **kwargs) -> nn.Module:
    name = "resnet50" if bottleneck else "resnet18"
    kwargs = {"stem_type": "deep", "stem_width": channels[0] // 2, **kwargs}
    model = timm.create_model(name, pretrained=False, num_classes=N_CLASSES, channels=channels,
                              layers=layers, **kwargs)
    return _exercised(model, seed)


def finetuned(model: nn.Module, seed: int = 7, scale: float = 0.05) -> nn.Module:
    """A seeded stand-in for a fine-tune: every float parameter and BN running mean moves by
    ``scale`` times its own spread, running variances by a factor ``1 + scale * noise``."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in out.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.mul_(1 + scale * noise)
            else:
                t.add_(scale * (float(t.std()) if t.numel() > 1 else 1.0) * noise)
    return out


def images(n: int, size: int, seed: int = 3, batch: int = 16) -> list[Tensor]:
    return list(torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
                .split(batch))


# ---------------------------------------------------------------------------------------------
# exact embeddings


def partial_permutation(d_s: int, d_t: int, gen: torch.Generator) -> Tensor:
    """[d_s, d_t]: source channel i is target channel cols[i]; the other target channels are
    extra. No sign flips: ReLU, GELU and LayerNorm are not odd functions."""
    embed = torch.zeros(d_s, d_t, dtype=torch.float64)
    embed[torch.arange(d_s), torch.randperm(d_t, generator=gen)[:d_s]] = 1.0
    return embed


def duplication(d_s: int, gen: torch.Generator) -> Tensor:
    """[d_s, 2 d_s]: every source channel twice, each copy scaled by 1/sqrt(2) (orthonormal
    rows). A LayerNorm over the channels sees the same mean and variance up to that scale, which
    it divides out."""
    cols = torch.randperm(2 * d_s, generator=gen)
    embed = torch.zeros(d_s, 2 * d_s, dtype=torch.float64)
    embed[torch.arange(d_s), cols[:d_s]] = embed[torch.arange(d_s), cols[d_s:]] = 2 ** -0.5
    return embed


def embed_weights(source: nn.Module, target: nn.Module, layout: ModelLayout,
                  embed: Callable[[SpaceKey], Tensor],
                  copies: Callable[[str], bool] = lambda name: False) -> None:
    """Write ``source`` seen through ``embed(space)`` into ``target`` (same block structure).

    Activations map as ``x_t = x_s @ embed``. A per-channel operator (depthwise kernel, layer
    scale; ``copies(name)``) is copied onto every target channel that holds its source channel;
    anything else on a channel (a norm's output scale and shift, a bias) follows the embedding.
    Extra target channels get zero weights and unit variances, so they stay zero.
    """
    state = {k: v.double() for k, v in source.state_dict().items() if v.is_floating_point()}
    new = dict(target.state_dict())
    for p in layout.params:
        w = state[p.name]
        t_out = embed(p.space_out) if p.space_out else None
        t_in = embed(p.space_in) if p.space_in else None
        if p.rule == "linear":
            value = t_out.T @ w @ t_in
        elif p.rule == "conv":
            value = torch.einsum("so,sikl,it->otkl", t_out, w, t_in)
        elif p.rule == "head":
            value = w @ t_in
        elif p.rule == "head_bias":
            value = w
        elif p.rule == "variance":
            value = t_out.square().T @ w + (t_out.abs().sum(0) == 0).double()
        elif p.rule == "depthwise" or copies(p.name):
            value = torch.einsum("sj,s...->j...", (t_out != 0).double(), w)
        else:  # vector, norm gain
            value = t_out.T @ w
        new[p.name] = value.to(new[p.name].dtype)
    target.load_state_dict(new)


def embedding_of(groups: Callable[[SpaceKey], Hashable],
                 make: Callable[[int, int, torch.Generator], Tensor], layout_s: ModelLayout,
                 layout_t: ModelLayout, seed: int = 11) -> Callable[[SpaceKey], Tensor]:
    """One embedding per coordinate group (spaces that are the same channels share one)."""
    widths_s = {s.key: s.width for s in layout_s.spaces}
    widths_t = {s.key: s.width for s in layout_t.spaces}
    gen = torch.Generator().manual_seed(seed)
    cache: dict[Hashable, Tensor] = {}

    def embed(key: SpaceKey) -> Tensor:
        if key.name == "pixels":  # both models read the same images
            return torch.eye(widths_s[key], dtype=torch.float64)
        group = groups(key)
        if group not in cache:
            cache[group] = make(widths_s[key], widths_t[key], gen)
        return cache[group]

    return embed


def convnext_groups(key: SpaceKey) -> Hashable:
    """Every block of a stage adds into the same residual stream (stage 0's is the stem's)."""
    return ("resid", key.block.stage) if key.name == "resid" else key


def resnet_groups(model: nn.Module) -> Callable[[SpaceKey], Hashable]:
    """Identity shortcuts chain ``in`` and ``out`` of a stage's blocks (and the stem's output
    into an identity first block); a downsample starts new channels."""
    chain, groups = 0, {SpaceKey(None, "stem"): 0}
    layers = [model.layer1, model.layer2, model.layer3, model.layer4]
    for s, layer in enumerate(layers):
        for i, block in enumerate(layer):
            groups[SpaceKey(BlockId(s, i), "in")] = chain
            chain += block.downsample is not None
            groups[SpaceKey(BlockId(s, i), "out")] = chain
    return lambda key: ("chain", groups[key]) if key in groups else key


def logits(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).double()


# ---------------------------------------------------------------------------------------------
# detection, accounting, depth

CONVNEXT_DIMS, RESNET_CHANNELS = (8, 12, 16, 8), (8, 12, 16, 20)
PAIRS = {  # (source, target of other widths and depths, image size)
    "convnext": (lambda: convnext(CONVNEXT_DIMS, (1, 1, 2, 1)),
                 lambda: convnext((12, 16, 24, 28), (2, 1, 3, 2), seed=1), 64),
    "resnet_basic": (lambda: resnet(RESNET_CHANNELS, (1, 1, 2, 1)),
                     lambda: resnet((12, 16, 24, 28), (2, 1, 3, 2), seed=1), 32),
    "resnet_bottleneck_se": (
        lambda: resnet((4, 6, 8, 10), (1, 1, 1, 1), bottleneck=True,
                       block_args={"attn_layer": "se"}, avg_down=True),
        lambda: resnet((6, 8, 10, 12), (1, 2, 2, 1), seed=1, bottleneck=True,
                       block_args={"attn_layer": "se"}, avg_down=True), 48),
}

@pytest.mark.filterwarnings("ignore:.*rank-deficient:UserWarning")
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_strict_transport_across_width_and_depth_accounts_for_every_parameter(pair):
    make_source, make_target, size = PAIRS[pair]
    source, target = make_source(), make_target()
    family = "timm_convnext" if pair == "convnext" else "timm_resnet"
    assert describe_model(source).family == describe_model(target).family == family
    before = {k: v.clone() for k, v in target.state_dict().items() if v.is_floating_point()}
    report = transport(source, finetuned(source), target, images(16, size), strict=True,
                       progress=False)
    assert report.skipped == ()
    listed = {p.name: p.rule for p in report.params}
    assert set(listed) == set(before), set(before) ^ set(listed)
    after = target.state_dict()
    for name in before:
        delta = after[name].double() - before[name].double()
        assert torch.isfinite(delta).all() and delta.abs().max() > 0, name
    rules = {p.role: p.rule for p in report.params}
    if family == "timm_convnext":
        assert rules["dw.weight"] == "depthwise" and rules["ls.gamma"] == "gain"
        assert rules["mlp.fc1.weight"] == "conv" and rules["norm.weight"] == "gain"
        assert ("3.1", "3.0") in report.block_map  # the deeper target's stage 3 pairs by depth
    else:
        assert rules["conv2.bn.running_var"] == "variance" and rules["downsample.weight"] == "conv"
        assert all(after[n].min() > 0 for n in listed if n.endswith("running_var"))
    assert rules["head.weight"] == "head"


VARIANTS = {
    "convnext_overlap_tiered_stem_head_hidden": lambda dims, depths, seed: convnext(
        dims, depths, seed, stem_type="overlap_tiered", head_hidden_size=24),
    "convnext_head_norm_first": lambda dims, depths, seed: convnext(
        dims, depths, seed, head_norm_first=True),
    "convnext_v2_grn_no_layer_scale_no_bias": lambda dims, depths, seed: convnext(
        dims, depths, seed, use_grn=True, ls_init_value=None, conv_bias=False),
    "resnet_plain_stem": lambda dims, depths, seed: resnet(dims, depths, seed, stem_type=""),
    "resnet_deep_tiered_stem": lambda dims, depths, seed: resnet(
        dims, depths, seed, stem_type="deep_tiered", stem_width=8),
}


@pytest.mark.filterwarnings("ignore:.*rank-deficient:UserWarning")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_stem_and_head_variants_are_described_completely(variant):
    """Other stems, heads and block options: a strict transport across width and depth lists
    every target tensor with a rule."""
    make = VARIANTS[variant]
    source = make((8, 12, 16, 8), (1, 1, 1, 1), 0)
    target = make((12, 16, 20, 12), (1, 2, 1, 1), 1)
    report = transport(source, finetuned(source), target, images(8, 32), progress=False)
    floats = {k for k, v in target.state_dict().items() if v.is_floating_point()}
    assert report.skipped == () and {p.name for p in report.params} == floats


def test_grouped_convolutions_are_named_by_a_strict_transport():
    source = resnet((8, 8, 8, 8), (1, 1, 1, 1), bottleneck=True, cardinality=2, base_width=64)
    target = resnet((8, 8, 8, 8), (1, 1, 1, 1), bottleneck=True, cardinality=2, base_width=64)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"layer1\.0\.conv2\.weight: no family rule describes"):
        transport(source, finetuned(source), target, images(8, 32), progress=False)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------------------------------------
# identical models and exact embeddings


@pytest.mark.parametrize("pair,gains", [
    ("convnext", "regression"),
    ("resnet_basic", "diagonal"),
    ("resnet_bottleneck_se", "diagonal"),
    ("resnet_basic", "regression"),
])
def test_identical_source_and_target_receive_the_task_vector_itself(pair, gains):
    make_source, _, size = PAIRS[pair]
    source = make_source()
    target = copy.deepcopy(source)
    tuned = finetuned(source)
    transport(source, tuned, target, images(16, size), gains=gains, progress=False)
    for name, value in tuned.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(target.state_dict()[name], value, atol=2e-5, rtol=1e-5)


def _full_rank(report) -> bool:
    return all(m.rank == min(m.d_source, m.d_target) for m in report.maps)


@pytest.mark.parametrize("gains", ["regression", "diagonal"])
@pytest.mark.parametrize("kind", ["basic_se", "bottleneck_avg_down"])
def test_resnet_exact_widening_computes_the_finetuned_source(kind, gains):
    """Every space widened by a partial permutation into a ResNet of wider stem, stages and
    bottlenecks; extra channels get zero weights, BN mean 0 and variance 1, so they stay zero
    through BN, ReLU, pooling, squeeze-excite and the residual adds. The maps must recover the
    permutations and every rule (conv, BN gain / shift / running statistics, head) be exact.
    BN gains by either rule (both exact under a partial permutation)."""
    if kind == "basic_se":
        kwargs, size = {"block_args": {"attn_layer": "se"}}, 32
        source = resnet(RESNET_CHANNELS, (1, 1, 1, 1), **kwargs)
        target = resnet((10, 14, 18, 22), (1, 1, 1, 1), seed=1, **kwargs)
    else:
        kwargs, size = {"bottleneck": True, "avg_down": True}, 48
        source = resnet((4, 6, 8, 10), (1, 2, 1, 1), **kwargs)
        target = resnet((6, 8, 10, 12), (1, 2, 1, 1), seed=1, **kwargs)
    layout_s, layout_t = describe_model(source), describe_model(target)
    embed = embedding_of(resnet_groups(source), partial_permutation, layout_s, layout_t)
    head = target.fc.weight.detach().clone()
    embed_weights(source, target, layout_s, embed)
    target.fc.weight.data.copy_(head)  # the target's own, untrained head
    x = images(16, size, seed=5)[0]
    with torch.no_grad():
        features = source.forward_features(x).flatten(2).transpose(1, 2).double()
        widened = target.forward_features(x).flatten(2).transpose(1, 2).double()
    torch.testing.assert_close(widened, features @ embed(SpaceKey(BlockId(3, 0), "out")),
                               atol=1e-5, rtol=1e-5)
    tuned = finetuned(source)
    report = transport(source, tuned, target, images(32, size), gains=gains, progress=False)
    assert _full_rank(report) and any(m.d_source < m.d_target for m in report.maps)
    torch.testing.assert_close(logits(target, x), logits(tuned, x), atol=1e-5, rtol=1e-5)


def test_convnext_permuted_copy_computes_the_finetuned_source():
    """Same widths, every coordinate group permuted on its own (each stage's residual stream,
    each block's MLP hidden layer): LayerNorm over channels is permutation-equivariant, so this
    is exact for every rule, including the depthwise kernels, norm gains and layer scales. (A
    wider stream cannot be padded with silent channels here: LayerNorm would average over them;
    the duplicated widening below is the exact wider target.)"""
    source = convnext(CONVNEXT_DIMS, (1, 1, 2, 1))
    target = convnext(CONVNEXT_DIMS, (1, 1, 2, 1), seed=1)
    layout_s, layout_t = describe_model(source), describe_model(target)
    embed = embedding_of(convnext_groups, partial_permutation, layout_s, layout_t)
    embed_weights(source, target, layout_s, embed)
    x = images(16, 64, seed=5)[0]
    torch.testing.assert_close(logits(target, x), logits(source, x), atol=1e-5, rtol=1e-5)
    torch.nn.init.normal_(target.head.fc.weight)
    tuned = finetuned(source)
    report = transport(source, tuned, target, images(16, 64), progress=False)
    assert _full_rank(report)
    torch.testing.assert_close(logits(target, x), logits(tuned, x), atol=1e-5, rtol=1e-5)


def test_convnext_duplicated_widening():
    """A ConvNeXt of twice the width that computes the source's function: every residual
    channel twice, each copy scaled by 1/sqrt(2) (a LayerNorm over the channels divides that
    scale out, so the base target is exact), each MLP hidden layer embedded by a partial
    permutation into the wider one.

    The maps recover the embedding, and every rule is exact: conv / bias / norm shift / head,
    the norm gains and layer scales (the gain regression), and the depthwise kernels (the
    diagonal of T^T diag(w) T normalised by sum_i T_ij^2, the least-squares diagonal d with
    diag(w) T ~ T diag(d); without the normalisation each copy got half of its change and the
    target missed 0.15 of the fine-tune's logit change).
    """
    source = convnext(CONVNEXT_DIMS, (1, 1, 2, 1))
    target = convnext(tuple(2 * d for d in CONVNEXT_DIMS), (1, 1, 2, 1), seed=1)
    layout_s, layout_t = describe_model(source), describe_model(target)
    streams = {s.width for s in layout_s.spaces if s.key.name == "resid"}

    def make(d_s: int, d_t: int, gen: torch.Generator) -> Tensor:
        return duplication(d_s, gen) if d_s in streams else partial_permutation(d_s, d_t, gen)

    embed = embedding_of(convnext_groups, make, layout_s, layout_t)
    is_scale = lambda name: name.endswith("gamma")  # noqa: E731 (the layer scale copies)
    embed_weights(source, target, layout_s, embed, copies=is_scale)
    x = images(16, 64, seed=5)[0]
    torch.testing.assert_close(logits(target, x), logits(source, x), atol=1e-4, rtol=1e-4)
    exact, tuned = copy.deepcopy(target), finetuned(source)
    embed_weights(tuned, exact, layout_s, embed, copies=is_scale)
    report = transport(source, tuned, target, images(16, 64), progress=False)
    assert _full_rank(report)
    got, want = target.state_dict(), exact.state_dict()
    for p in report.params:
        torch.testing.assert_close(got[p.name].double(), want[p.name].double(), atol=2e-5,
                                   rtol=1e-4, msg=p.name)
    torch.testing.assert_close(logits(target, x), logits(tuned, x), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# channels-last ConvNeXt


def test_channels_last_convnext_transports_like_the_conv_mlp_one():
    source = convnext(CONVNEXT_DIMS, (1, 1, 2, 1), conv_mlp=False)
    target = convnext((12, 16, 24, 28), (2, 1, 3, 2), seed=1, conv_mlp=False)
    assert describe_model(target).family == "timm_convnext"
    report = transport(source, finetuned(source), target, images(16, 64), progress=False)
    assert {p.rule for p in report.params if p.role == "mlp.fc1.weight"} == {"linear"}
    assert report.skipped == ()
