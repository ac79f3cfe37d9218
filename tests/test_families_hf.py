"""Hugging Face encoder and vision families: RoBERTa / XLM-R, DeBERTa-v2, ViT, CLIP and SigLIP
vision towers, on tiny random-init models (real transformers classes, CPU, eager attention).

The exact widenings embed every coordinate space of a source model isometrically in a model of
twice its width, so that Procrustes maps can recover the embedding exactly:

- the residual stream is duplicated, ``x' = [x, x] / sqrt(2)``; a LayerNorm over the doubled
  stream sees the same mean and variance / 2, so it stays exact with gain and shift
  ``[g, g] / sqrt(2)`` and half the epsilon;
- attention heads are kept, not duplicated: the target has twice as many heads of the same size,
  the first ones the source's, the others silent (zero query, key and value rows). Duplicating a
  head isometrically would give both copies ``q / sqrt(2)`` and ``k / sqrt(2)``, halving every
  attention score, so no isometric widening duplicates heads;
- MLP hidden units (and pooler / projection outputs) are kept likewise, extra ones silent
  (GELU(0) = quick_gelu(0) = tanh(0) = 0).

The widened base model computes the source's function (checked first); after the transport it
must compute the finetuned source's function. Norm gains are exact only with the gain regression
(``gains="regression"``), which compensates the RMS ratio of a norm over a wider stream.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch import Tensor, nn
from transformers import (
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    DebertaV2Config,
    DebertaV2Model,
    RobertaConfig,
    RobertaModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)

from warmstart.engine.families import describe_model
from warmstart.engine.families.base import ModelLayout, ParamRole, SpaceKey
from warmstart.engine.transport import transport

VOCAB = 96
EPS = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared, loaded CPU two threads made a
    transport here 70 times slower (22 s against 0.3 s) by spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# tiny models: width d, depth n, heads h (of size d / h), MLP hidden f, LayerNorm epsilon eps


def _text(cls, config_cls, d, n, h, f, eps, **extra):
    config = config_cls(vocab_size=VOCAB, hidden_size=d, num_hidden_layers=n,
                        num_attention_heads=h, intermediate_size=f, layer_norm_eps=eps,
                        max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, **extra)
    config._attn_implementation = "eager"
    return cls(config).eval()


def _vision(cls, config_cls, d, n, h, f, eps, image=32, **extra):
    config = config_cls(hidden_size=d, num_hidden_layers=n, num_attention_heads=h,
                        intermediate_size=f, layer_norm_eps=eps, image_size=image, patch_size=8,
                        **extra)
    config._attn_implementation = "eager"
    return cls(config).eval()


BUILDERS = {
    "bert": lambda *a, **k: _text(BertModel, BertConfig, *a, **k),
    "roberta": lambda *a, **k: _text(RobertaModel, RobertaConfig, *a, **k),
    "xlm_roberta": lambda *a, **k: _text(XLMRobertaModel, XLMRobertaConfig, *a, **k),
    "deberta": lambda *a, **k: _text(  # DeBERTa-v2: separate position projections
        DebertaV2Model, DebertaV2Config, *a, relative_attention=True, position_buckets=8,
        max_relative_positions=16, pos_att_type=["p2c", "c2p"], share_att_key=False,
        norm_rel_ebd="layer_norm", **k),
    "deberta_v3": lambda *a, **k: _text(  # DeBERTa-v3: key/query projections shared with them
        DebertaV2Model, DebertaV2Config, *a, relative_attention=True, position_buckets=8,
        max_relative_positions=16, pos_att_type=["p2c", "c2p"], share_att_key=True,
        norm_rel_ebd="layer_norm", position_biased_input=False, **k),
    "vit": lambda *a, **k: _vision(ViTModel, ViTConfig, *a, **k),
    "vit_classifier": lambda *a, **k: _vision(ViTForImageClassification, ViTConfig, *a,
                                              num_labels=3, **k),
    "clip": lambda *a, **k: _vision(CLIPVisionModel, CLIPVisionConfig, *a, **k),
    "clip_projection": lambda *a, **k: _vision(CLIPVisionModelWithProjection, CLIPVisionConfig,
                                               *a, projection_dim=16, **k),
    "siglip": lambda *a, **k: _vision(SiglipVisionModel, SiglipVisionConfig, *a, **k),
}
FAMILY_OF = {"bert": "hf_bert", "roberta": "hf_roberta", "xlm_roberta": "hf_xlm_roberta",
             "deberta": "hf_deberta", "deberta_v3": "hf_deberta", "vit": "hf_vit",
             "vit_classifier": "hf_vit",
             "clip": "hf_clip_vision", "clip_projection": "hf_clip_vision",
             "siglip": "hf_siglip_vision"}
TEXT = ("bert", "roberta", "xlm_roberta", "deberta", "deberta_v3")


def build(kind: str, d: int = 32, n: int = 2, h: int = 2, f: int = 64, eps: float = EPS,
          seed: int = 0, **extra) -> nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[kind](d, n, h, f, eps, **extra)
    with torch.no_grad():  # non-trivial gains and shifts, and weights of a trained scale
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p) if p.ndim == 1 else 0.02 * torch.randn_like(p))
    return model


def calibration(kind: str, n_batches: int = 3, batch: int = 16, seed: int = 1,
                image: int = 32) -> list:
    g = torch.Generator().manual_seed(seed)
    if kind not in TEXT:
        return [torch.randn(batch, 3, image, image, generator=g) for _ in range(n_batches)]
    pad = 0 if kind == "bert" else 1
    out = []
    for _ in range(n_batches):
        lengths = torch.randint(4, 13, (batch,), generator=g)
        mask = (torch.arange(12)[None] < lengths[:, None]).long()
        ids = torch.randint(3, VOCAB, (batch, 12), generator=g)
        out.append({"input_ids": torch.where(mask.bool(), ids, pad), "attention_mask": mask})
    return out


def with_task_vector(model: nn.Module, layout: ModelLayout, seed: int = 2,
                     scale: float = 0.05) -> nn.Module:
    """A finetuned copy: every parameter moves by ``scale * std * randn``, except those that
    keep a zero delta in a default transport (embeddings and excluded parts), so the finetuned
    function is reachable exactly."""
    frozen = {p.name for p in layout.params if p.rule == "embedding"} | set(layout.excluded)
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(out.named_parameters()):
            if name not in frozen:
                std = float(p.std()) if p.numel() > 1 else 1.0
                p.add_(scale * std * torch.randn(p.shape, generator=g))
    return out


def outputs(model: nn.Module, batch) -> dict[str, Tensor]:
    with torch.no_grad():
        out = model(**batch) if isinstance(batch, dict) else model(batch)
    return {k: v for k, v in out.items() if isinstance(v, Tensor) and k != "attentions"}


def float_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: v.detach().clone() for n, v in model.state_dict().items() if v.is_floating_point()}


# ---------------------------------------------------------------------------------------------
# exact widening, driven by the target's own layout


def _duplicate(d_s: int, d_t: int) -> Tensor:
    assert d_t == 2 * d_s
    return torch.cat([torch.eye(d_s), torch.eye(d_s)], 1).double() / math.sqrt(2)


def _keep(d_s: int, d_t: int) -> Tensor:
    return torch.eye(d_s, d_t, dtype=torch.float64)


def embedding_of(layout_s: ModelLayout, layout_t: ModelLayout, key: SpaceKey | None
                 ) -> Tensor | None:
    """The isometric embedding ``[d_s, d_t]`` of one space: the stream duplicated, the rest kept."""
    if key is None:
        return None
    d_s, d_t = layout_s.space(key).width, layout_t.space(key).width
    return _duplicate(d_s, d_t) if key.name == "resid" else _keep(d_s, d_t)


def _moved(role: ParamRole, value: Tensor, m_out: Tensor | None, m_in: Tensor | None) -> Tensor:
    if role.rule == "linear":
        return m_out.T @ value @ m_in
    if role.rule in ("vector", "gain"):  # a duplication moves gains like vectors: [g, g] / sqrt 2
        return m_out.T @ value
    if role.rule == "embedding":  # the feature dimension: first of a conv, else last
        return torch.einsum("s...,st->t...", value, m_out) if value.ndim == 4 else value @ m_out
    if role.rule == "head":
        return value @ m_in
    assert role.rule == "head_bias", role
    return value


def widen(source: nn.Module, target: nn.Module) -> nn.Module:
    """Write into ``target`` (as deep, twice as wide, any family whose roles correspond) the exact
    widening of ``source``, role by role; parts without a rule (excluded) keep their weights."""
    layout_s, layout_t = describe_model(source), describe_model(target)
    by_role = {p.key: p for p in layout_s.params}
    state = source.state_dict()
    with torch.no_grad():
        for role in layout_t.params:
            role_s = by_role[role.key]
            value = state[role_s.name].double()
            if role_s.rows is not None:
                value = value[role_s.rows[0]:role_s.rows[1]]
            new = _moved(role, value, embedding_of(layout_s, layout_t, role.space_out),
                         embedding_of(layout_s, layout_t, role.space_in))
            param = target.get_parameter(role.name)
            (param if role.rows is None else param[role.rows[0]:role.rows[1]]).copy_(new)
    return target


def widened_pair(kind: str, **extra) -> tuple[nn.Module, nn.Module]:
    source = build(kind, 32, 2, 2, 64, EPS, **extra)
    target = widen(source, build(kind, 64, 2, 4, 96, EPS / 2, seed=5, **extra))
    return source, target


def assert_embeds(kind: str, target_out: dict, source_out: dict, atol: float) -> None:
    """Every output of the target is the source's, embedded: the stream (and CLIP's normed class
    token) duplicated, pooler and projection outputs kept (extra coordinates silent), logits
    equal. SigLIP's pooled output comes from its attention-pooling head, which keeps the target's
    own weights (a zero delta), so it is not compared."""
    stream = ("last_hidden_state",) + (("pooler_output",) if kind.startswith("clip") else ())
    for key, value in source_out.items():
        if kind == "siglip" and key == "pooler_output":
            continue
        got, want = target_out[key].double(), value.double()
        embed = _duplicate if key in stream else _keep
        want = want @ embed(want.shape[-1], got.shape[-1])
        err = float((got - want).abs().max() / want.abs().max())
        assert err < atol, f"{key}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------
# detection


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_families_are_detected_and_describe_every_parameter(kind):
    model = build(kind)
    layout = describe_model(model)
    assert layout.family == FAMILY_OF[kind]
    described = {p.name for p in layout.params} | set(layout.excluded)
    missing = [n for n, v in model.state_dict().items()
               if v.is_floating_point() and n not in described]
    assert not missing
    roles = {p.role for p in layout.params}
    assert {"attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
            "mlp.fc1.weight", "mlp.fc2.weight"} <= roles
    norms = {"attn.norm.weight", "mlp.norm.weight"} if kind in TEXT else \
        {"norm1.weight", "norm2.weight", "final_norm.weight"}
    assert norms <= roles


def test_optional_parts_are_described_or_excluded_with_a_reason():
    deberta = describe_model(build("deberta", conv_kernel_size=3, embedding_size=24))
    roles = {p.role for p in deberta.params}
    assert {"attn.pos_k.weight", "attn.pos_q.weight", "embed.relative", "rel.norm.weight"} <= roles
    assert "encoder.conv.conv.weight" in deberta.excluded
    assert "embeddings.embed_proj.weight" in deberta.excluded
    v3 = describe_model(build("deberta_v3"))
    assert not any(p.role.startswith("attn.pos_") for p in v3.params)
    siglip = describe_model(build("siglip"))
    head = [n for n in siglip.excluded if n.endswith("head.attention.in_proj_weight")]
    assert len(head) == 1  # (inside ``vision_model`` before transformers 5)
    prefix = head[0].removesuffix("attention.in_proj_weight")
    assert all(n.startswith(prefix) for n in siglip.excluded)
    assert prefix + "probe" in siglip.excluded
    clip = describe_model(build("clip_projection"))
    projection = [p for p in clip.params if p.role == "projection.weight"]
    assert [p.name for p in projection] == ["visual_projection.weight"]
    assert {p.role for p in clip.params} >= {"norm_pre.weight", "final_norm.weight"}
    vit = describe_model(build("vit"))
    assert {p.name for p in vit.params if p.role.startswith("pooler")} == {
        "pooler.dense.weight", "pooler.dense.bias"}


# ---------------------------------------------------------------------------------------------
# transport


def _accounted(report, target: nn.Module) -> set[str]:
    listed = {p.name.split("[")[0] for p in report.params}
    skipped = {n for n, reason in report.skipped if reason}
    return set(float_state(target)) - listed - skipped


@pytest.mark.parametrize("kind", ["roberta", "deberta", "deberta_v3", "vit_classifier",
                                  "clip_projection", "siglip"])
def test_strict_transport_across_width_and_depth(kind):
    """32 wide x 2 deep -> 48 wide x 3 deep (other head count and MLP width; for the towers
    another image size, hence another patch grid): every target parameter is transported or
    listed with a reason, and the transported ones move by finite, non-zero deltas."""
    source = build(kind, 32, 2, 2, 64)
    layout = describe_model(source)
    finetuned = with_task_vector(source, layout)
    image = 32 if kind in TEXT else 40
    target = build(kind, 48, 3, 3, 96, seed=3, **({} if kind in TEXT else {"image": image}))
    before = float_state(target)
    report = transport(source, finetuned, target, calibration(kind), strict=True,
                       progress=False)
    assert (report.source_family, report.target_family) == (FAMILY_OF[kind],) * 2
    assert not _accounted(report, target)
    after = float_state(target)
    for p in report.params:
        name = p.name.split("[")[0]
        delta = after[name].double() - before[name].double()
        assert torch.isfinite(delta).all(), name
        assert delta.abs().max() > 0, f"{name} did not change"
    skipped = dict(report.skipped)
    embeddings = {p.name for p in describe_model(target).params if p.rule == "embedding"}
    assert set(skipped) == embeddings | set(describe_model(target).excluded)
    for name in skipped:
        assert torch.equal(after[name], before[name]), name


@pytest.mark.parametrize("kind", ["roberta", "xlm_roberta", "deberta", "vit", "clip_projection",
                                  "siglip"])
def test_identical_source_and_target_receive_the_task_vector_itself(kind):
    source = build(kind)
    layout = describe_model(source)
    finetuned = with_task_vector(source, layout)
    target = copy.deepcopy(source)
    transport(source, finetuned, target, calibration(kind), progress=False)
    want = float_state(finetuned)
    for name, value in float_state(target).items():
        torch.testing.assert_close(value, want[name], atol=2e-5, rtol=0, msg=name)


@pytest.mark.parametrize("kind", ["roberta", "deberta", "deberta_v3", "vit", "vit_classifier",
                                  "clip_projection", "siglip"])
def test_exact_widening_computes_the_finetuned_source(kind):
    source, target = widened_pair(kind)
    layout_s = describe_model(source)
    probe = calibration(kind, n_batches=1, seed=9)[0]
    assert_embeds(kind, outputs(target, probe), outputs(source, probe), 1e-5)
    finetuned = with_task_vector(source, layout_s)
    report = transport(source, finetuned, target, calibration(kind), progress=False)
    assert all(m.determined for m in report.maps)
    assert_embeds(kind, outputs(target, probe), outputs(finetuned, probe), 1e-4)


# ---------------------------------------------------------------------------------------------
# across families: parameters pair by role


def _timm_vit(d: int = 32, n: int = 2, h: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=d, depth=n, num_heads=h, mlp_ratio=2.0, num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p) if p.ndim == 1 else 0.02 * torch.randn_like(p))
    return model.eval()


def test_bert_to_roberta_pairs_by_role_and_stays_exact():
    """A RoBERTa built as the exact widening of a BERT computes the finetuned BERT's function
    after a strict transport. RoBERTa numbers positions from ``padding_idx + 1`` = 2, so its
    position table is BERT's moved down two rows; each model gets its own padding id."""
    source = build("bert")
    target = widen(source, build("roberta", 64, 2, 4, 96, EPS / 2, seed=5))
    with torch.no_grad():
        table = target.embeddings.position_embeddings.weight
        table[2:] = table[:-2].clone()
    probe_s, probe_t = calibration("bert", 1, seed=9)[0], calibration("roberta", 1, seed=9)[0]
    real = probe_s["attention_mask"].bool()

    def assert_exact(model_s: nn.Module, atol: float) -> None:
        got, want = outputs(target, probe_t), outputs(model_s, probe_s)
        stream = want["last_hidden_state"].double() @ _duplicate(32, 64)
        err = (got["last_hidden_state"][real].double() - stream[real]).abs().max()
        assert err / stream.abs().max() < atol
        pooled = want["pooler_output"].double() @ _keep(32, 64)
        assert (got["pooler_output"].double() - pooled).abs().max() < atol

    assert_exact(source, 1e-5)
    finetuned = with_task_vector(source, describe_model(source))
    report = transport(source, finetuned, target, calibration("bert"),
                       target_calibration=calibration("roberta"), strict=True, progress=False)
    assert (report.source_family, report.target_family) == ("hf_bert", "hf_roberta")
    assert not _accounted(report, target)
    assert_exact(finetuned, 1e-4)


def test_timm_vit_to_hf_vit_pairs_by_role_and_stays_exact():
    """timm's fused ``attn.qkv`` rows pair with HF ViT's separate projections, ``head`` with
    ``classifier``: an HF ViT classifier built as the exact widening of a timm ViT predicts the
    finetuned timm ViT's logits after a strict transport."""
    source = _timm_vit()
    target = widen(source, build("vit_classifier", 64, 2, 4, 96, 1e-6 / 2, seed=5))
    probe = calibration("vit", 1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(target(probe).logits, source(probe), atol=1e-5, rtol=0)
    finetuned = with_task_vector(source, describe_model(source))
    report = transport(source, finetuned, target, calibration("vit"), strict=True, progress=False)
    assert (report.source_family, report.target_family) == ("timm_vit", "hf_vit")
    assert not _accounted(report, target)
    with torch.no_grad():
        torch.testing.assert_close(target(probe).logits, finetuned(probe), atol=1e-4, rtol=0)


def test_vit_to_siglip_pairs_a_class_token_model_with_one_without():
    """A ViT's class token has no counterpart in SigLIP (patch rows pair, resized from a 4 x 4 to
    a 5 x 5 grid): the transport is strict and accounts for every target parameter."""
    source = build("vit_classifier")
    finetuned = with_task_vector(source, describe_model(source))
    target = build("siglip", 48, 3, 3, 96, seed=3, image=40)
    report = transport(source, finetuned, target, calibration("vit"), strict=True, progress=False)
    assert (report.source_family, report.target_family) == ("hf_vit", "hf_siglip_vision")
    assert not _accounted(report, target)
    assert {p.role for p in report.params} >= {"attn.q.weight", "norm1.weight", "final_norm.weight"}


def test_vit_to_clip_refuses_strictly_only_what_has_no_counterpart():
    """CLIP normalises the embeddings before the first layer (``pre_layrnorm``) and projects the
    pooled token (``visual_projection``), which a ViT does not: a strict transport refuses them,
    naming them and leaving the target untouched; a non-strict one lists them with the reason
    and transports everything else. CLIP's final norm sees only the pooled class token, ViT's
    every token; the gain regression cannot pair those rows yet, so gains move by the diagonal
    rule here."""
    source = build("vit_classifier")
    finetuned = with_task_vector(source, describe_model(source))
    target = build("clip_projection", 48, 3, 3, 96, seed=3)
    before = float_state(target)
    with pytest.raises(ValueError, match=r"pre_layrnorm.weight: the source \(hf_vit\) has no "
                                         r"'norm_pre.weight'"):
        transport(source, finetuned, target, calibration("vit"), strict=True, gains="diagonal",
                  progress=False)
    assert all(torch.equal(v, before[k]) for k, v in float_state(target).items())
    report = transport(source, finetuned, target, calibration("vit"), strict=False,
                       gains="diagonal", progress=False)
    skipped = dict(report.skipped)
    assert {k for k, r in skipped.items() if "has no" in r} == {
        "vision_model.pre_layrnorm.weight", "vision_model.pre_layrnorm.bias",
        "visual_projection.weight"}
    assert not _accounted(report, target)
    assert "vision_model.post_layernorm.weight" in {p.name for p in report.params}
