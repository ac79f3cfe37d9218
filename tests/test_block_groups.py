"""``block_group``: statistics, maps and updates a few blocks at a time give the one-pass result."""

from __future__ import annotations

import copy

import pytest
import timm
import torch

from warmstart.engine.transport import transport


def _vit(depth: int, dim: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             embed_dim=dim, depth=depth, num_heads=2, num_classes=3)


def _finetuned(model, seed: int = 7):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return out


@pytest.mark.parametrize("block_group", [1, 2])
def test_grouped_passes_give_the_one_pass_update(block_group):
    source, target = _vit(3, 32, 0), _vit(4, 48, 1)
    finetuned = _finetuned(source)
    g = torch.Generator().manual_seed(3)
    calibration = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(3)]
    one_pass, grouped = copy.deepcopy(target), copy.deepcopy(target)
    report_one = transport(source, finetuned, one_pass, calibration, progress=False)
    report_grouped = transport(source, finetuned, grouped, calibration, progress=False,
                               block_group=block_group)
    for (name, a), b in zip(one_pass.state_dict().items(), grouped.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
    assert [m.target_space for m in report_grouped.maps] == \
        [m.target_space for m in report_one.maps]
    assert {p.name for p in report_grouped.params} == {p.name for p in report_one.params}


def test_grouped_passes_refuse_a_one_shot_iterator():
    source, target = _vit(2, 32, 0), _vit(2, 48, 1)
    before = copy.deepcopy(target.state_dict())
    calibration = (torch.randn(4, 3, 32, 32) for _ in range(2))
    with pytest.raises(ValueError, match="one-shot iterator; pass a list or a DataLoader"):
        transport(source, _finetuned(source), target, calibration, progress=False, block_group=1)
    assert all(torch.equal(before[n], t) for n, t in target.state_dict().items())


def test_embeddings_map_moves_the_patch_convolution_along_its_output_channels():
    source, target = _vit(2, 32, 0), _vit(2, 48, 1)
    finetuned = _finetuned(source)
    g = torch.Generator().manual_seed(3)
    calibration = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    before = target.patch_embed.proj.weight.detach().clone()
    report = transport(source, finetuned, target, calibration, progress=False, embeddings="map")
    rules = {p.name: p.rule for p in report.params}
    assert rules["patch_embed.proj.weight"] == "embedding"
    assert not torch.equal(target.patch_embed.proj.weight, before)
