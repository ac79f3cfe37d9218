"""Exactness and behaviour of the transport on small real models."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from warmstart.engine.procrustes import CrossStatistics, procrustes_map
from warmstart.engine.transport import transport


class TinyMLP(nn.Module):
    """fc1 -> act -> fc2 -> head; names are identical across widths (the generic family)."""

    def __init__(self, d_in: int = 20, hidden: int = 16, d_out: int = 6, n_classes: int = 3,
                 act: nn.Module | None = None):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = act if act is not None else nn.Tanh()
        self.fc2 = nn.Linear(hidden, d_out)
        self.head = nn.Linear(d_out, n_classes)

    def forward(self, x):
        return self.head(self.fc2(self.act(self.fc1(x))))


def _perturbed(model: nn.Module, scale: float = 0.05, seed: int = 1) -> nn.Module:
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def _signed_partial_permutation(d_s: int, d_t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = torch.randperm(d_t, generator=g)[:d_s]
    signs = torch.randint(0, 2, (d_s,), generator=g) * 2 - 1
    p = torch.zeros(d_s, d_t)
    p[torch.arange(d_s), cols] = signs.float()
    return p


def _widen(source: TinyMLP, embed: torch.Tensor, act: nn.Module | None = None) -> TinyMLP:
    """The target computing the same function with hidden units ``h @ embed``."""
    target = TinyMLP(source.fc1.in_features, embed.shape[1], source.fc2.out_features,
                     source.head.out_features, act)
    with torch.no_grad():
        target.fc1.weight.copy_(embed.T @ source.fc1.weight)
        target.fc1.bias.copy_(embed.T @ source.fc1.bias)
        target.fc2.weight.copy_(source.fc2.weight @ embed)
        target.fc2.bias.copy_(source.fc2.bias)
        target.head.weight.normal_()  # the target's own (untrained) head
    return target


def _calibration(n_batches: int = 6, batch: int = 64, d_in: int = 20, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d_in, generator=g) for _ in range(n_batches)]


def test_identical_source_and_target_receive_the_task_vector_itself():
    source = TinyMLP()
    finetuned = _perturbed(source)
    target = copy.deepcopy(source)
    report = transport(source, finetuned, target, _calibration(), progress=False)
    for name, value in finetuned.state_dict().items():
        torch.testing.assert_close(target.state_dict()[name], value, atol=1e-5, rtol=0)
    assert report.method == "theseus" and report.alpha == 1.0
    assert all(m.rank == min(m.d_source, m.d_target) for m in report.maps)


def test_identical_vits_receive_the_task_vector_itself():
    def vit():
        torch.manual_seed(0)
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4)
        with torch.no_grad():  # non-zero biases and gains: activations of full rank
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        return m

    source, target = vit(), vit()
    finetuned = _perturbed(source, 0.01)
    calibration = [torch.randn(16, 3, 32, 32) for _ in range(6)]
    report = transport(source, finetuned, target, calibration, progress=False)
    for name, value in finetuned.state_dict().items():
        if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
            torch.testing.assert_close(target.state_dict()[name], source.state_dict()[name])
        else:
            torch.testing.assert_close(target.state_dict()[name], value, atol=2e-4, rtol=0)
    assert {p.role for p in report.params} >= {"attn.q.weight", "attn.k.weight", "attn.v.weight"}


@pytest.mark.parametrize("act", [nn.Tanh(), nn.Identity()], ids=["tanh", "linear"])
def test_exact_widening_computes_the_finetuned_source(act):
    source = TinyMLP(act=act)
    if isinstance(act, nn.Identity):  # a linear model embedded by a random orthogonal map
        q, _ = torch.linalg.qr(torch.randn(24, 24))
        embed = q[:16]
    else:  # hidden units embedded by a signed partial permutation, extra units silent
        embed = _signed_partial_permutation(16, 24, seed=3)
    target = _widen(source, embed, act)
    finetuned = _perturbed(source)
    x = torch.randn(256, 20)
    torch.testing.assert_close(target.fc2(target.act(target.fc1(x))),
                               source.fc2(source.act(source.fc1(x))), atol=1e-5, rtol=0)
    report = transport(source, finetuned, target, _calibration(), progress=False)
    torch.testing.assert_close(target(x), finetuned(x), atol=1e-4, rtol=0)
    widths = {m.target_space: (m.rank, m.d_source, m.d_target) for m in report.maps}
    assert widths["fc1:out"] == (16, 16, 24)


def test_rank_deficient_maps_are_reported_and_warned():
    source = TinyMLP(d_in=4)  # 16 hidden units driven by 4 inputs: rank 5 of 16
    target = _widen(source, _signed_partial_permutation(16, 24, seed=4))
    with pytest.warns(UserWarning, match=r"fc1:out rank 5/16 from 384 rows"):
        report = transport(source, _perturbed(source), target, _calibration(d_in=4),
                           completion="none", progress=False)
    deficient = [m for m in report.maps if not m.determined]
    assert [m.target_space for m in deficient] == ["fc1:out"]
    assert report.summary()["maps_rank_deficient"] == 1.0


def test_head_is_the_whole_finetuned_head_mapped_on_its_input_side():
    source = TinyMLP()
    finetuned = _perturbed(source)
    target = TinyMLP(d_out=9)
    calibration = _calibration()
    transport(source, finetuned, target, calibration, method="head_only", progress=False)
    stats = CrossStatistics(6, 9)
    with torch.no_grad():
        for x in calibration:
            a = source.fc2(source.act(source.fc1(x)))
            b = target.fc2(target.act(target.fc1(x)))
            stats.update(a, b)
    expected = finetuned.head.weight.double() @ procrustes_map(stats).map
    torch.testing.assert_close(target.head.weight.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(target.head.bias, finetuned.head.bias)


def test_head_only_leaves_the_body_alone_and_slice_crops():
    source = TinyMLP()
    finetuned = _perturbed(source)
    target = TinyMLP(hidden=24)
    body = {k: v.clone() for k, v in target.state_dict().items() if not k.startswith("head")}
    transport(source, finetuned, copy.deepcopy(target), _calibration(), method="head_only",
              progress=False)
    sliced = copy.deepcopy(target)
    transport(source, finetuned, sliced, method="slice", progress=False)
    tau = finetuned.fc1.weight - source.fc1.weight
    torch.testing.assert_close(sliced.fc1.weight[:16], body["fc1.weight"][:16] + tau)
    torch.testing.assert_close(sliced.fc1.weight[16:], body["fc1.weight"][16:])


def test_alpha_scales_the_delta_and_auto_picks_the_best_on_the_grid():
    source = TinyMLP()
    finetuned = _perturbed(source)
    target = copy.deepcopy(source)
    report = transport(source, finetuned, target, _calibration(), alpha=2.5, progress=False)
    expected = source.fc1.weight + 2.5 * (finetuned.fc1.weight - source.fc1.weight)
    torch.testing.assert_close(target.fc1.weight, expected, atol=1e-5, rtol=0)
    assert report.alpha == 2.5

    ideal = source.fc1.weight + 1.5 * (finetuned.fc1.weight - source.fc1.weight)

    def loss(model):  # minimised exactly at alpha = 1.5
        return float((model.fc1.weight.detach() - ideal.detach()).square().sum())

    target = copy.deepcopy(source)
    report = transport(source, finetuned, target, _calibration(), alpha="auto", evaluate=loss,
                       alpha_grid=(0.5, 1.0, 1.5, 2.0), progress=False)
    assert report.alpha == 1.5
    assert [a for a, _ in report.alpha_scores] == [0.5, 1.0, 1.5, 2.0]
    torch.testing.assert_close(target.fc1.weight, ideal, atol=1e-5, rtol=0)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, snapshot) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in snapshot.items())


@pytest.mark.parametrize("kwargs,match", [
    ({"alpha": float("nan")}, "alpha must be a finite number or 'auto'"),
    ({"alpha": "auto"}, "alpha='auto' needs evaluate"),
    ({"method": "magic"}, "method must be one of"),
    ({"whiten": 0.9}, r"whiten must be a power in \[0, 0.5\]"),
    ({"depthwise": "keep"}, "depthwise must be one of \\('diagonal', 'zero'\\)"),
    ({"embeddings": "copy"}, "embeddings must be one of \\('zero', 'map'\\)"),
    ({"solver": "qr"}, r"solver must be one of \('auto', 'svd', 'eigh'\)"),
    ({"center": "no"}, r"center must be True or False, got 'no'"),
    ({"rows_per_batch": 0}, r"rows_per_batch must be None \(every row\) or a number of rows >= 1"),
    ({"strict": 1}, r"strict must be True or False, got 1"),
    ({"calibration": []}, "calibration data yielded no batches"),
    ({"calibration": None}, "needs calibration inputs"),
])
def test_bad_options_fail_before_touching_the_target(kwargs, match):
    source = TinyMLP()
    target = TinyMLP(hidden=24)
    before = _snapshot(target)
    args = {"calibration": _calibration(), **kwargs}
    calibration = args.pop("calibration")
    with pytest.raises(ValueError, match=match):
        transport(source, _perturbed(source), target, calibration, progress=False, **args)
    assert _unchanged(target, before)


def test_head_with_other_classes_fails_and_leaves_the_target_untouched():
    source = TinyMLP()
    target = TinyMLP(hidden=24, n_classes=5)
    before = _snapshot(target)
    with pytest.raises(ValueError, match="must predict the same classes"):
        transport(source, _perturbed(source), target, _calibration(), progress=False)
    assert _unchanged(target, before)


def test_non_finite_calibration_is_refused():
    source, target = TinyMLP(), TinyMLP(hidden=24)
    before = _snapshot(target)
    bad = _calibration()
    bad[1][0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        transport(source, _perturbed(source), target, bad, progress=False)
    assert _unchanged(target, before)


def test_unmatched_parameters_are_an_error_unless_opted_out():
    class Extra(TinyMLP):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.gate = nn.Linear(6, 6)

        def forward(self, x):
            return self.head(self.gate(self.fc2(self.act(self.fc1(x)))))

    source = TinyMLP()
    target = Extra(hidden=24)
    before = _snapshot(target)
    with pytest.raises(ValueError, match=r"gate.weight: the source \(generic\) has no"):
        transport(source, _perturbed(source), target, _calibration(), progress=False)
    assert _unchanged(target, before)
    report = transport(source, _perturbed(source), target, _calibration(), strict=False,
                       progress=False)
    assert ("gate.weight", "the source (generic) has no 'gate.weight'") in report.skipped
    torch.testing.assert_close(target.gate.weight, before["gate.weight"])


def test_half_precision_target_is_updated_in_float64_and_cast_once():
    source = TinyMLP()
    finetuned = _perturbed(source)
    target = copy.deepcopy(source).to(torch.bfloat16)
    reference = copy.deepcopy(source)
    transport(source, finetuned, reference, _calibration(), progress=False)
    transport(source, finetuned, target, _calibration(), progress=False)
    assert target.fc1.weight.dtype == torch.bfloat16
    expected = (source.fc1.weight.bfloat16().double()
                + (reference.fc1.weight - source.fc1.weight).double()).bfloat16()
    assert (target.fc1.weight.float() - expected.float()).abs().max() < 2e-2


def test_transport_is_bit_identical_when_repeated():
    source = TinyMLP()
    finetuned = _perturbed(source)
    results = []
    for _ in range(2):
        target = TinyMLP(hidden=24)
        torch.manual_seed(5)
        target = TinyMLP(hidden=24)
        transport(source, finetuned, target, _calibration(), progress=False)
        results.append(_snapshot(target))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_rows_per_batch_keeps_a_reproducible_subset_of_each_batch():
    source = TinyMLP()
    embed = _signed_partial_permutation(16, 24, seed=3)
    finetuned = _perturbed(source)
    x = torch.randn(256, 20)

    def run(**options):
        target = _widen(source, embed)
        report = transport(source, finetuned, target, _calibration(), progress=False, **options)
        return target, report

    full, full_report = run()
    every_row, _ = run(rows_per_batch=64)  # the batches have 64 rows: nothing is dropped
    assert _unchanged(every_row, _snapshot(full))
    sampled, report = run(rows_per_batch=24)
    again, _ = run(rows_per_batch=24)
    assert {m.n_rows for m in full_report.maps} == {6 * 64}
    assert {m.n_rows for m in report.maps} == {6 * 24}
    assert _unchanged(again, _snapshot(sampled))
    assert not _unchanged(sampled, _snapshot(full))  # other rows, other float sums
    # an exact widening is recovered from any rows that determine the maps (rank 16 of 16)
    assert all(m.determined for m in report.maps)
    torch.testing.assert_close(sampled(x), finetuned(x), atol=1e-4, rtol=0)


def test_row_sampler_draws_the_same_rows_for_every_pairing_of_a_batch():
    from warmstart.engine.activations import RowSampler

    sampler = RowSampler(5)
    rows = torch.arange(12.0)[:, None]
    sampler.new_batch(0)
    a, b = sampler(rows, rows * 10)
    a2, _ = sampler(rows + 100, rows)
    assert a.shape == (5, 1) and torch.equal(b, a * 10) and torch.equal(a2, a + 100)
    assert torch.equal(a.flatten(), a.flatten().sort().values)  # rows keep their order
    sampler.new_batch(1)
    assert not torch.equal(sampler(rows, rows)[0], a)
    short = torch.ones(3, 2)
    assert sampler(short, short)[0] is short
    assert RowSampler(None)(rows, rows)[0] is rows


@pytest.mark.parametrize("shapes,layout", [
    (((4, 3, 6, 5), (4, 7, 6, 5)), "channels"),
    (((4, 3, 3, 4), (4, 7, 6, 5)), "channels"),  # the source map is resized first
    (((4, 6, 5, 3), (4, 6, 5, 7)), "last"),  # channels-last maps
])
def test_feature_map_rows_are_picked_before_they_are_copied_out(shapes, layout):
    from warmstart.engine.activations import RowSampler, pair_rows
    from warmstart.engine.families.base import SequenceInfo

    source, target = (torch.randn(*shape) for shape in shapes)
    info = SequenceInfo()
    sampler = RowSampler(17)
    sampler.new_batch(3)
    expected = sampler(*pair_rows(source, target, info, info, layout))
    picked = pair_rows(source, target, info, info, layout, sampler=sampler)
    assert picked[0].shape == (17, 3) and picked[1].shape == (17, 7)
    assert torch.equal(picked[0], expected[0]) and torch.equal(picked[1], expected[1])


@pytest.mark.parametrize("case", ["masked", "grid", "grid_prefixes_differ", "grid_no_prefix"])
def test_token_rows_are_picked_before_they_are_copied_out(case):
    from warmstart.engine.activations import RowSampler, pair_rows
    from warmstart.engine.families.base import SequenceInfo

    g = torch.Generator().manual_seed(5)
    if case == "masked":
        mask = torch.rand(4, 9, generator=g) > 0.3
        info_s = info_t = SequenceInfo(mask=mask)
        shape_s, shape_t = (4, 9, 3), (4, 9, 7)
    else:
        prefix_s, prefix_t = {"grid": (1, 1), "grid_prefixes_differ": (2, 1),
                              "grid_no_prefix": (0, 0)}[case]
        info_s = SequenceInfo(prefix=prefix_s, grid=(3, 4))
        info_t = SequenceInfo(prefix=prefix_t, grid=(3, 4))
        shape_s, shape_t = (4, prefix_s + 12, 3), (4, prefix_t + 12, 7)
    source = torch.randn(*shape_s, generator=g)
    target = torch.randn(*shape_t, generator=g)
    sampler = RowSampler(11)
    sampler.new_batch(2)
    expected = sampler(*pair_rows(source, target, info_s, info_t, "last"))
    picked = pair_rows(source, target, info_s, info_t, "last", sampler=sampler)
    assert picked[0].shape == (11, 3) and picked[1].shape == (11, 7)
    assert torch.equal(picked[0], expected[0]) and torch.equal(picked[1], expected[1])


class TinyCNN(nn.Module):
    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_bn_recalibration_averages_batch_statistics_of_the_transported_target():
    source = TinyCNN()
    finetuned = _perturbed(source)
    target = TinyCNN()
    images = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    report = transport(source, finetuned, target, images, bn_recalibration=2, progress=False)
    assert report.options["bn_recalibration"] == 2
    with torch.no_grad():
        feats = [target.conv(x) for x in images[:2]]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(target.bn.running_mean, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(target.bn.running_var, var, atol=1e-5, rtol=1e-4)
    assert target.bn.momentum == 0.1 and target.training


def test_bn_recalibration_errors_leave_the_target_untouched():
    source, target = TinyCNN(), TinyCNN()
    before = _snapshot(target)
    with pytest.raises(ValueError, match="bn_recalibration must be a number of batches >= 0"):
        transport(source, _perturbed(source), target, [torch.randn(4, 3, 8, 8)],
                  bn_recalibration=-1, progress=False)
    generator = (torch.randn(8, 3, 8, 8) for _ in range(2))
    with pytest.raises(ValueError, match="not a generator"):
        transport(source, _perturbed(source), target, generator, bn_recalibration=1,
                  progress=False)
    assert _unchanged(target, before)


def test_eigh_solver_transports_like_the_svd():
    """The polished Gram eigendecomposition (the default on CUDA) against the exact SVD, on a
    ViT pair of different width and depth: same ranks, and updates that agree to far below the
    float32 noise that separates a GPU transport from a CPU one (6.6e-4, tests/test_gpu.py).
    Measured here: 1.5e-7."""
    from .test_real_pairs import tiny_vit, with_task_vector

    source, target = tiny_vit(48, 3, 32, seed=0), tiny_vit(64, 5, 40, seed=1)
    finetuned = with_task_vector(source, seed=2, scale=1e-2)
    calibration = list(torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(3))
                       .split(16))
    by_svd, by_eigh = copy.deepcopy(target), copy.deepcopy(target)
    svd_report = transport(source, finetuned, by_svd, calibration, progress=False)
    eigh_report = transport(source, finetuned, by_eigh, calibration, solver="eigh",
                            progress=False)
    assert svd_report.options["solver"] == "svd"  # "auto" on the CPU
    assert eigh_report.options["solver"] == "eigh"
    assert [m.rank for m in svd_report.maps] == [m.rank for m in eigh_report.maps]
    base = target.state_dict()
    worst = 0.0
    for name, value in by_svd.state_dict().items():
        update = value.double() - base[name].double()
        gap = (by_eigh.state_dict()[name].double() - value.double()).norm()
        worst = max(worst, float(gap / update.norm().clamp_min(1e-12)))
    print(f"eigh vs svd: largest relative update gap {worst:.1e}")
    assert worst < 1e-5, worst


def test_large_float16_activations_are_not_taken_for_overflow():
    # every activation finite, but their float16 sum would overflow (> 65504)
    source = TinyMLP(d_in=20).half()
    target = TinyMLP(d_in=20, hidden=24).half()
    with torch.no_grad():
        for model in (source, target):
            model.fc1.bias.fill_(60.0)
    calibration = [torch.randn(512, 20).half() for _ in range(2)]
    report = transport(source, _perturbed(source.float()).half(), target, calibration,
                       progress=False)
    assert all(m.n_rows == 1024 for m in report.maps)
