"""Norm gains move as per-channel scales, fitted on calibration rows (``engine/gains.py``)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from warmstart.engine.transport import transport


class NormNet(nn.Module):
    """fc -> norm -> ReLU -> head: a norm gain between two linear layers. ReLU is positively
    homogeneous, so a stream scaled by 1/sqrt(2) stays a scaled copy after it."""

    def __init__(self, d: int = 12, d_in: int = 16, n_classes: int = 3, eps: float = 1e-5,
                 norm: type[nn.Module] = nn.LayerNorm, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.fc = nn.Linear(d_in, d)
        self.norm = norm(d, eps=eps)
        self.act = act()
        self.head = nn.Linear(d, n_classes)
        with torch.no_grad():  # a zero shift leaves the norm's output one dimension short
            self.norm.weight.normal_(1.0, 0.2)
            if getattr(self.norm, "bias", None) is not None:
                self.norm.bias.normal_()

    def forward(self, x):
        return self.head(self.act(self.norm(self.fc(x))))


def _finetuned(model: nn.Module, seed: int = 1) -> nn.Module:
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return out


def _duplicated(source: NormNet) -> NormNet:
    """Every hidden channel twice: the target stream is ``[h, h] / sqrt(2)``. LayerNorm keeps it
    exact once its eps is halved (the variance halves); the gain is ``[g, g] / sqrt(2)``."""
    d = source.norm.normalized_shape[0]
    t = torch.cat([torch.eye(d), torch.eye(d)], 1) / math.sqrt(2)  # [d, 2d], orthonormal rows
    target = NormNet(2 * d, source.fc.in_features, source.head.out_features,
                     eps=source.norm.eps / 2)
    with torch.no_grad():
        target.fc.weight.copy_(t.T @ source.fc.weight)
        target.fc.bias.copy_(t.T @ source.fc.bias)
        target.norm.weight.copy_(t.T @ source.norm.weight)
        target.norm.bias.copy_(t.T @ source.norm.bias)
        target.head.weight.normal_()
    return target


def _calibration(d_in: int = 16, n: int = 6, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, d_in, generator=g) for _ in range(n)]


@pytest.mark.parametrize("gains", ["regression", "diagonal"])
def test_duplicated_channels_get_the_finetuned_gain_only_by_regression(gains):
    torch.manual_seed(0)
    source = NormNet()
    finetuned = _finetuned(source)
    target = _duplicated(source)
    transport(source, finetuned, target, _calibration(), progress=False, gains=gains)
    x = torch.randn(32, 16)
    error = (target(x) - finetuned(x)).abs().max().item()
    if gains == "regression":
        assert error < 1e-4
    else:  # the diagonal drops the coupling of the two copies: the gain change is halved
        assert error > 1e-2


def test_signed_permutation_never_flips_a_gain():
    """RMSNorm commutes with a signed permutation (LayerNorm's mean would not), so the widened
    target computes the source exactly; its gains are the source's, permuted, never negated."""
    torch.manual_seed(0)
    source = NormNet(d=8, norm=nn.RMSNorm, act=nn.Tanh)  # tanh is odd: signs pass through
    finetuned = _finetuned(source)
    g = torch.Generator().manual_seed(5)
    cols = torch.randperm(12, generator=g)[:8]
    p = torch.zeros(8, 12)  # a signed partial permutation into 12 channels
    p[torch.arange(8), cols] = torch.tensor([1.0, -1.0] * 4)
    target = NormNet(d=12, norm=nn.RMSNorm, eps=source.norm.eps * 8 / 12, act=nn.Tanh)
    with torch.no_grad():  # zero-padded channels shrink the RMS by sqrt(8/12): compensated
        target.fc.weight.copy_(p.T @ source.fc.weight)
        target.fc.bias.copy_(p.T @ source.fc.bias)
        target.norm.weight.copy_(p.abs().T @ source.norm.weight * math.sqrt(8 / 12))
        target.head.weight.copy_(source.head.weight @ p)
        target.head.bias.copy_(source.head.bias)
    x = torch.randn(32, 16)
    torch.testing.assert_close(target(x), source(x), atol=1e-5, rtol=0)
    report = transport(source, finetuned, target, _calibration(), progress=False)
    torch.testing.assert_close(target(x), finetuned(x), atol=1e-4, rtol=0)
    assert {r.rule for r in report.params if r.name == "norm.weight"} == {"gain"}
