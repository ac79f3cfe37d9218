"""Bad inputs to ``transport`` and ``TaskVectorTransport``: every one fails with an error that names
the argument, layer or file, what was found and what to do, and leaves the target bit-for-bit as it
was (values, dtypes, devices, training flags). The few inputs that are documented to succeed
(rank-deficient statistics, half-precision targets, a zero task vector) are checked for exactly what
the documentation promises instead.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from contextlib import contextmanager

import lightning as L
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from warmstart.engine.transport import transport
from warmstart.lightning.callbacks import TaskVectorTransport

from .test_callbacks import MLPModule
from .test_real_pairs import tiny_vit
from .test_transport import TinyCNN, TinyMLP, _calibration, _perturbed


@contextmanager
def leaves_unchanged(model: nn.Module):
    """Check that ``model`` (every parameter and buffer, with dtype and device, and every training
    flag) is exactly as it was when the block started, whatever the block raised."""
    state = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    try:
        yield
    finally:
        after = model.state_dict()
        assert after.keys() == state.keys()
        for name, before in state.items():
            now = after[name]
            assert (now.dtype, now.device, now.shape) == (before.dtype, before.device,
                                                          before.shape), name
            assert now.is_meta or torch.equal(_bits(now), _bits(before)), f"{name} was changed"
        assert [m.training for m in model.modules()] == flags


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits of a floating tensor, so that NaN compares equal to the same NaN."""
    if not tensor.is_floating_point():
        return tensor
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def _bert(hidden: int, seed: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=2 * hidden, vocab_size=50,
                                max_position_embeddings=16))


def _text_batch(mask_length: int = 8) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[1, mask_length:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def mlp():
    """A tiny source, its fine-tuned copy and a wider target (generic family)."""
    torch.manual_seed(0)
    source = TinyMLP()
    return source, _perturbed(source), TinyMLP(hidden=24)


@pytest.fixture(scope="module")
def vits():
    source = tiny_vit(32, 2, 32, seed=0)
    return source, _perturbed(source, 0.01), tiny_vit(48, 3, 32, seed=1)


def _images(n: int = 4) -> list[torch.Tensor]:
    return [torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))]


def _fails(mlp, error, match, finetuned=None, target=None, calibration=None, **kwargs):
    """``transport`` on the MLP pair (with replacements) raises ``error`` and changes nothing."""
    source, tuned, wide = mlp
    target = wide if target is None else target
    with leaves_unchanged(target), pytest.raises(error, match=match):
        transport(source, tuned if finetuned is None else finetuned, target,
                  _calibration(2) if calibration is None else calibration, progress=False,
                  **kwargs)


# --------------------------------------------------------------------------- checkpoints (1-4)


def test_missing_finetuned_checkpoint(mlp, tmp_path):
    _fails(mlp, FileNotFoundError, r"missing\.safetensors does not exist; pass the path of a",
           finetuned=str(tmp_path / "missing.safetensors"))


def test_pretrained_given_as_a_path_is_refused(mlp, tmp_path):
    source, tuned, target = mlp
    with leaves_unchanged(target), pytest.raises(
            TypeError, match=r"source_pretrained must be an nn.Module, got str '.*missing\.ckpt'; "
                             r"build the source model"):
        transport(str(tmp_path / "missing.ckpt"), tuned, target, _calibration(2), progress=False)


@pytest.mark.parametrize("name,found", [
    ("bad.safetensors", r"\S.*"),  # the safetensors reader's own words
    ("bad.ckpt", r"the file is damaged or not a torch checkpoint \(\S.*\)"),
    ("bad.pt", r"the file is damaged or not a torch checkpoint \(\S.*\)"),
], ids=["safetensors", "ckpt", "pt"])
def test_corrupt_checkpoint(mlp, tmp_path, name, found):
    (tmp_path / name).write_bytes(b"\x00\x01 definitely not weights \xff" * 8)
    _fails(mlp, ValueError, rf"could not read checkpoint .*{name}: {found}.*; expected a "
                            r"safetensors/\.pt/\.bin/\.ckpt file", finetuned=str(tmp_path / name))


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.pop("fc2.bias"), r"only in pretrained: 'fc2.bias' \(1 in all\)"),
    (lambda sd: sd.update({"extra.weight": torch.ones(2)}),
     r"only in finetuned: 'extra.weight' \(1 in all\)"),
], ids=["missing-key", "extra-key"])
def test_pretrained_finetuned_key_mismatch(mlp, edit, match):
    state = {k: v.clone() for k, v in mlp[1].state_dict().items()}
    edit(state)
    _fails(mlp, ValueError, rf"different floating-point keys \({match}\); load matching", state)


def test_wrapper_prefix_is_stripped_and_unfitting_keys_are_refused(mlp, tmp_path):
    source, tuned, wide = mlp
    wrapped = {f"model.model.{k}": v for k, v in tuned.state_dict().items()}
    wrapped["optimizer_step"] = torch.tensor(3.0)  # other entries of a user's checkpoint
    torch.save(wrapped, tmp_path / "ft.pt")
    plain, prefixed = copy.deepcopy(wide), copy.deepcopy(wide)
    transport(source, tuned, plain, _calibration(2), progress=False)
    transport(source, str(tmp_path / "ft.pt"), prefixed, _calibration(2), progress=False)
    for name, value in plain.state_dict().items():
        assert torch.equal(prefixed.state_dict()[name], value), name
    torch.save({"encoder.w": torch.zeros(2)}, tmp_path / "other.pt")
    _fails(mlp, ValueError, r"no key of source_finetuned fits the source model, with or without a "
                            r"wrapper prefix \(checkpoint keys: 'encoder.w' \(1 in all\); source "
                            r"model keys: 'fc1.bias'", str(tmp_path / "other.pt"))


def test_pretrained_finetuned_shape_mismatch(mlp):
    state = {k: v.clone() for k, v in mlp[1].state_dict().items()}
    state["fc1.weight"] = torch.zeros(17, 20)
    _fails(mlp, ValueError, r"shapes differ for 1 keys \('fc1.weight': \[16, 20\] vs \[17, 20\]; "
                            r".*same architecture on both sides", state)


def test_finetuned_head_with_other_classes(mlp):
    tuned = _perturbed(TinyMLP(n_classes=5))
    state = {**mlp[1].state_dict(), "head.weight": tuned.head.weight, "head.bias": tuned.head.bias}
    _fails(mlp, ValueError, r"head.weight: the head rule produced shape \(5, 6\) but the target "
                            r"parameter has shape \(3, 6\); .*must predict the same classes", state)


# --------------------------------------------------------------------------- models (5, 15)


@pytest.mark.parametrize("pair,match", [
    ("vit->mlp", r"38 parameter\(s\) cannot be matched between source \(timm_vit\) and target "
                 r"\(generic\): fc1.weight: the source \(timm_vit\) has no 'fc1.weight'.*"
                 r"strict=False"),
    ("vit->mlp-lenient", r"no paired activations observe the target spaces \['head:in'\]"),
    ("mlp->vit", r"target \(timm_vit\) has 3 blocks in stage 0, the source \(generic\) none; "
                 r"only models with the same stage structure"),
    ("vit->efficientnet", r"source \(timm_vit\) has 1 stages of blocks, target "
                          r"\(timm_efficientnet\) has 7; only models with the same stage"),
    ("vit->bert", r"parameter\(s\) cannot be matched between source \(timm_vit\) and target "
                  r"\(hf_bert\): .*'attn.norm.weight'"),
], ids=["vit->mlp", "vit->mlp-lenient", "mlp->vit", "vit->efficientnet", "vit->bert"])
def test_unrelated_families(mlp, vits, pair, match):
    import timm

    vit, vit_tuned, vit_target = vits
    source, tuned, calibration, kwargs = vit, vit_tuned, _images(), {}
    if pair.startswith("vit->mlp"):
        target = mlp[2]
        kwargs = {"strict": False} if pair.endswith("lenient") else {}
    elif pair == "mlp->vit":
        source, tuned, target, calibration = *mlp[:2], vit_target, _calibration(2)
    elif pair == "vit->efficientnet":
        target = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=4)
    else:
        target = _bert(16, seed=0)
    with leaves_unchanged(target), pytest.raises(ValueError, match=match):
        transport(source, tuned, target, calibration, progress=False, **kwargs)


def test_unknown_family_name(mlp):
    _fails(mlp, ValueError, r"unknown model family 'vit'; known families: \[.*'timm_vit'\]",
           target_family="vit")


def test_target_given_as_a_state_dict(mlp):
    source, tuned, target = mlp
    state = target.state_dict()
    with leaves_unchanged(target), pytest.raises(
            TypeError, match=r"target must be an nn.Module, got OrderedDict with 6 entries; pass "
                             r"the model itself"):
        transport(source, tuned, state, _calibration(2), progress=False)


@pytest.mark.parametrize("where", ["target", "source_pretrained", "source_finetuned"])
def test_model_on_the_meta_device(mlp, where):
    """There is no GPU here: the meta device (no data) stands in for a model the engine cannot
    read. Calibration batches are moved to each model's device automatically (``move_to``), so
    the only device error left is a model, or weights, with no data."""
    source, tuned, target = mlp
    if where == "target":
        target = TinyMLP(hidden=24).to("meta")
    elif where == "source_pretrained":
        source = copy.deepcopy(source).to("meta")
    else:
        tuned = {k: v.to("meta") for k, v in tuned.state_dict().items()}
    with leaves_unchanged(target), pytest.raises(
            ValueError, match=rf"{where} has \d+ tensor\(s\) on the meta device, which hold no "
                              r"data \(e.g. 'fc1\.(weight|bias)'\); "
                              r"(materialize|pass real weights)"):
        transport(source, tuned, target, _calibration(2), progress=False)


def test_calibration_batch_on_the_meta_device(mlp):
    _fails(mlp, ValueError, r"calibration tensor \(8, 20\) is on the meta device, which holds no "
                            r"data, so it cannot be moved to the model's device \(cpu\)",
           calibration=[torch.randn(8, 20, device="meta")])


# --------------------------------------------------------------------------- calibration (6-8, 13)


@pytest.mark.parametrize("empty", [
    [], DataLoader(TensorDataset(torch.empty(0, 20)), batch_size=4), iter([torch.randn(4, 20)]),
], ids=["list", "dataloader", "used-up-iterator"])
def test_calibration_that_yields_nothing(mlp, empty):
    if not isinstance(empty, (list, DataLoader)):
        next(empty)  # a one-shot iterator that an earlier step already consumed
    _fails(mlp, ValueError, r"the calibration data yielded no batches; pass a non-empty iterable",
           calibration=empty)


@pytest.mark.parametrize("batch,match", [
    ("abc", r"calibration batch 1 does not fit the source model \(TinyMLP\): TypeError: .*must "
            r"be Tensor, not str\. Calibration must yield that model's inputs only"),
    ((torch.randn(8, 20), torch.zeros(8)), r"calibration batch 1 does not fit the source model "
     r"\(TinyMLP\): TypeError: .*takes 2 positional arguments but 3 were given.*\(no labels\)"),
    (torch.randn(8, 30), r"calibration batch 1 does not fit the source model \(TinyMLP\): "
                         r"RuntimeError: mat1 and mat2 shapes cannot be multiplied \(8x30"),
], ids=["string", "with-labels", "wrong-width"])
def test_calibration_batch_of_the_wrong_structure(mlp, batch, match):
    _fails(mlp, ValueError, match, calibration=[_calibration(2)[0], batch])


@pytest.mark.parametrize("calibration,match", [
    (torch.randn(64, 20), r"calibration must be an iterable of batches, got one Tensor of shape "
                          r"\(64, 20\); wrap a single batch in a list"),
    ({"x": torch.randn(64, 20)}, r"calibration must be an iterable of batches, got one mapping"),
    (5, r"calibration must be an iterable of batches \(a list of model inputs or a DataLoader\), "
        r"got int 5"),
], ids=["tensor", "mapping", "int"])
def test_calibration_that_is_not_a_list_of_batches(mlp, calibration, match):
    _fails(mlp, TypeError, match, calibration=calibration)


def test_modality_mismatch_between_calibration_and_family(vits):
    source, tuned, target = vits
    with leaves_unchanged(target), pytest.raises(
            ValueError, match=r"ViT calibration batches must be images \[B, C, H, W\], got a "
                              r"tensor of shape \(4, 20\)"):
        transport(source, tuned, target, [torch.randn(4, 20)], progress=False)
    bert_s, bert_t = _bert(16, seed=0), _bert(24, seed=1)
    with leaves_unchanged(bert_t), pytest.raises(
            ValueError, match=r"text models need calibration batches that are mappings with "
                              r"'input_ids' .*got Tensor; tokenize the calibration text first"):
        transport(bert_s, _perturbed(bert_s, 0.01), bert_t, [torch.randint(0, 50, (4, 8))],
                  progress=False)


def test_max_batches_zero(mlp):
    _fails(mlp, ValueError, r"calibration_batches must be None \(all batches\) or a number of "
                            r"batches >= 1, got 0", calibration_batches=0)


def test_too_few_rows_warn_with_their_numbers_and_are_completed_by_default(mlp):
    """Three calibration rows determine rank 3 of every map. The documented behaviour (transport's
    docstring, README step 3) is not an error: with ``completion="none"`` the transport warns with
    each map's rank, width and row count and records them in the report; with the default
    ``completion="crop"`` the undetermined directions are filled deterministically, so there is
    nothing to warn about and the report says how many were filled. There is no strict variant
    that refuses rank-deficient statistics: ``strict`` is about unmatched parameters, and the
    default ``strict=True`` is used here."""
    source, tuned, target = mlp
    few = [torch.randn(3, 20, generator=torch.Generator().manual_seed(7))]
    with pytest.warns(UserWarning, match=r"5 of 5 maps are rank-deficient \(fc1:in rank 3/20 "
                                         r"from 3 rows, fc1:out rank 3/16 from 3 rows, fc2:in "
                                         r"rank 3/16 from 3 rows\); their undetermined"):
        report = transport(source, tuned, copy.deepcopy(target), few, completion="none",
                           progress=False)
    assert {(m.rank, m.n_rows, m.completed) for m in report.maps} == {(3, 3, 0)}
    assert report.summary()["maps_rank_deficient"] == 5.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = transport(source, tuned, copy.deepcopy(target), few, progress=False)
    widths = {m.target_space: (m.rank, m.completed, min(m.d_source, m.d_target))
              for m in report.maps}
    assert widths["fc1:in"] == (3, 17, 20) and widths["fc1:out"] == (3, 13, 16)
    assert all(m.determined for m in report.maps)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")],
                         ids=["nan", "inf", "-inf"])
def test_non_finite_calibration_inputs(mlp, value):
    batch = torch.randn(8, 20)
    batch[3, 4] = value
    _fails(mlp, ValueError, r"source layer 'fc1' \((in|out)put\): calibration activations "
                            r"contain NaN or Inf; check the calibration inputs",
           calibration=[_calibration(2)[0], {"x": batch}])


@pytest.mark.parametrize("where", ["target", "source_pretrained", "source_finetuned"])
def test_non_finite_weights(mlp, where):
    """A NaN weight shows up as non-finite activations (models) or is refused up front (the
    finetuned checkpoint of a diverged run)."""
    source, tuned, target = mlp
    broken = {"target": target, "source_pretrained": source, "source_finetuned": tuned}[where]
    broken = copy.deepcopy(broken)
    with torch.no_grad():
        broken.fc2.weight[0, 0] = float("nan")
    match = {"target": r"target layer 'fc2' \(output\): calibration activations contain NaN",
             "source_pretrained": r"source layer 'fc2' \(output\): calibration activations",
             "source_finetuned": r"source_finetuned holds NaN or Inf in 1 tensor\(s\) "
                                 r"\(fc2.weight\); the fine-tuning diverged"}[where]
    models = {"target": target, "source_pretrained": source, "source_finetuned": tuned,
              where: broken}
    with leaves_unchanged(models["target"]), pytest.raises(ValueError, match=match):
        transport(models["source_pretrained"], models["source_finetuned"], models["target"],
                  _calibration(2), progress=False)


def test_half_precision_overflow_is_refused_before_writing(mlp):
    """fp16 tops out at 65504: a value finite in float64 can overflow when cast."""
    target = copy.deepcopy(mlp[2]).half()
    _fails(mlp, ValueError, r"the transported value of fc1.weight is not finite in "
                            r"torch.float16; nothing was written. Check alpha",
           target=target, alpha=1e7)


@pytest.mark.parametrize("case", ["token-counts", "masks", "batch-sizes", "batch-counts"])
def test_rows_that_cannot_be_paired(mlp, case):
    """Activations are paired row by row; where the two sides disagree on which rows exist, the
    error names the space, the two counts and the remedy."""
    source, tuned, target = mlp
    calibration = [torch.randn(4, 5, 20)]
    if case == "masks":  # the two tokenizers split example 1 differently
        source, target = _bert(16, seed=0), _bert(24, seed=1)
        tuned = _perturbed(source, 0.01)
        calibration, target_calibration = [_text_batch()], [_text_batch(mask_length=5)]
    elif case == "token-counts":
        target_calibration = [torch.randn(4, 7, 20)]
    elif case == "batch-sizes":
        target_calibration = [torch.randn(6, 5, 20)]
    else:
        calibration, target_calibration = calibration * 2, calibration
    match = {
        "token-counts": r"fc1:in \(fc1:in -> fc1:in\): 5 source tokens cannot be paired with 7 "
                        r"target tokens without an attention mask or a patch grid",
        "masks": r"block0.0.attn_q .*: token counts differ between source and target for "
                 r"examples \[1\] \(source \[8\], target \[5\]\); .*Use the same tokenizer",
        "batch-sizes": r"source batch has 4 examples, target 6; feed both models the same",
        "batch-counts": r"calibration and target_calibration yield different numbers of batches",
    }[case]
    with leaves_unchanged(target), pytest.raises(ValueError, match=match):
        transport(source, tuned, target, calibration, target_calibration=target_calibration,
                  progress=False)


# --------------------------------------------------------------------------- options (9-11)


@pytest.mark.parametrize("alpha,match", [
    (-1.0, r"alpha must be >= 0, got -1.0: the task head is replaced .*use alpha=0"),
    (float("nan"), r"alpha must be a finite number or 'auto', got nan"),
    (float("inf"), r"alpha must be a finite number or 'auto', got inf"),
    ("big", r"alpha must be a finite number or 'auto', got 'big'"),
    ("1.0", r"alpha must be a finite number or 'auto', got '1.0'"),
    (True, r"alpha must be a finite number or 'auto', got True"),
], ids=["negative", "nan", "inf", "word", "numeric-string", "bool"])
def test_invalid_alpha(mlp, alpha, match):
    _fails(mlp, ValueError, match, alpha=alpha)


@pytest.mark.parametrize("grid,match", [
    ([], r"alpha_grid must be a non-empty list of finite numbers, got \[\]"),
    ([1.0, float("nan")], r"alpha_grid must be a non-empty list of finite numbers, got \[1.0, nan"),
    ([-1.0, 1.0], r"alpha_grid values must be >= 0, got \[-1.0, 1.0\]"),
    (["low"], r"alpha_grid must be a non-empty list of finite numbers, got \['low'\]"),
], ids=["empty", "nan", "negative", "string"])
def test_invalid_alpha_grid(mlp, grid, match):
    _fails(mlp, ValueError, match, alpha="auto", alpha_grid=grid, evaluate=lambda model: 0.0)


def test_failing_evaluation_restores_the_target(mlp):
    """``alpha="auto"`` writes each trial alpha; an evaluation that raises must not leave one."""
    def evaluate(model):
        raise RuntimeError("validation data went missing")

    _fails(mlp, RuntimeError, "validation data went missing", alpha="auto", evaluate=evaluate)


@pytest.mark.parametrize("whiten", [-0.1, 0.6, float("nan"), "0.5", True],
                         ids=["negative", "above-half", "nan", "string", "bool"])
def test_invalid_whitening_power(mlp, whiten):
    _fails(mlp, ValueError, rf"whiten must be a power in \[0, 0.5\], got {re.escape(repr(whiten))}",
           whiten=whiten)


@pytest.mark.parametrize("mapping,error,match", [
    ([0, 1, 2], ValueError, r"depth_mapping entry 2 -> 2 is out of range: target blocks are "
                            r"0..2, source blocks 0..1"),
    ([0, -1, 1], ValueError, r"depth_mapping entry 1 -> -1 is out of range"),
    ({7: 0}, ValueError, r"depth_mapping entry 7 -> 0 is out of range: target blocks are 0..2"),
    ([0, 1], ValueError, r"depth_mapping lists 2 source blocks but the target has 3 blocks; "
                         r"give one source index per target block, or a dict"),
    (5, TypeError, r"depth_mapping must be a list with one source block index per target block, "
                   r"or a dict \{target block: source block\}, got int 5"),
    ("011", TypeError, r"depth_mapping must be a list .*got str '011'"),
    ([0, 0.5, 1], TypeError, r"depth_mapping entries must be integer block indices \(target -> "
                             r"source\), got 1 -> 0.5; write e.g. \[0, 0, 1\]"),
    ([0, True, 1], TypeError, r"depth_mapping entries must be integer block indices .*1 -> True"),
    ({"last": 1}, TypeError, r"depth_mapping entries must be integer block indices .*'last' -> 1"),
], ids=["out-of-range", "negative", "unknown-target-block", "too-short", "int", "string",
        "float-entry", "bool-entry", "string-key"])
def test_invalid_depth_mapping(vits, mapping, error, match):
    source, tuned, target = vits
    with leaves_unchanged(target), pytest.raises(error, match=match):
        transport(source, tuned, target, _images(), depth_mapping=mapping, progress=False)


def test_depth_mapping_for_a_model_without_blocks(mlp):
    _fails(mlp, ValueError, r"depth_mapping lists 1 source blocks but the target has 0 blocks",
           depth_mapping=[0])


def test_failed_batchnorm_recalibration_restores_the_written_update():
    """``slice`` writes first and recalibrates BatchNorm after; a batch the target cannot run
    fails after the write, which must be undone."""
    source, target = TinyCNN(), TinyCNN()
    bad = [torch.randn(4, 5, 8, 8)]  # five channels for a three-channel convolution
    with leaves_unchanged(target), pytest.raises(
            ValueError, match=r"calibration batch 0 does not fit the target model \(TinyCNN\): "
                              r"RuntimeError: .*3 channels"):
        transport(source, _perturbed(source), target, bad, method="slice", bn_recalibration=1,
                  progress=False)


# --------------------------------------------------------------------------- precision (14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_target_is_cast_once(mlp, dtype):
    """Not an error: a half-precision target gets ``theta + alpha * delta`` computed in float64 and
    cast once. Compared with copies of the same (already rounded) weights in float64 and float32:
    without maps (``slice``) the result is exactly the float64 transport cast to ``dtype`` and
    within one rounding step of the float32 transport cast; with maps (estimated from
    half-precision activations) it stays close to the float32 result."""
    source, tuned, base = mlp
    for method, calibration in (("slice", None), ("theseus", _calibration(2))):
        half = copy.deepcopy(base).to(dtype)
        start = copy.deepcopy(half.state_dict())
        wide, single = copy.deepcopy(half).double(), copy.deepcopy(half).float()
        for model in (half, wide, single):
            transport(source, tuned, model, calibration, method=method, alpha=1.5, progress=False)
        for name, value in half.state_dict().items():
            assert value.dtype == dtype, name
            reference = single.state_dict()[name]
            if method == "slice":
                assert torch.equal(value, wide.state_dict()[name].to(dtype)), name
                step = torch.finfo(dtype).eps * reference.to(dtype).double().abs()
                assert ((value.double() - reference.to(dtype).double()).abs() <= step).all(), name
            else:
                moved = (reference - start[name].float()).norm()
                assert (value.float() - reference).norm() <= 0.05 * moved, name


def test_source_and_target_of_different_dtypes(mlp):
    """Not an error either: each model gets the calibration in its own dtype."""
    source, tuned, base = mlp
    target = copy.deepcopy(base).bfloat16()
    report = transport(copy.deepcopy(source).double(), tuned, target, _calibration(2),
                       progress=False)
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v).all()
               for v in target.state_dict().values())
    assert not torch.equal(target.fc1.weight, base.fc1.weight.bfloat16())
    assert all(math.isfinite(m.residual) for m in report.maps)


def test_zero_task_vector_warns(mlp):
    source, _, target = mlp
    with pytest.warns(UserWarning, match=r"the task vector is zero: source_finetuned equals "
                                         r"source_pretrained on all 4 shared tensors"):
        transport(source, copy.deepcopy(source), copy.deepcopy(target), _calibration(2),
                  progress=False)


# --------------------------------------------------------------------------- callback (1, 2, 12)


@pytest.fixture(scope="module")
def saved_finetuned(mlp, tmp_path_factory):
    path = tmp_path_factory.mktemp("source") / "finetuned.safetensors"
    save_file({k: v.contiguous() for k, v in mlp[1].state_dict().items()}, str(path))
    return str(path)


def _fit_fails(tmp_path, mlp, callback, error, match):
    """A one-step fit with ``callback`` raises ``error`` and leaves the module untouched."""
    module = MLPModule(copy.deepcopy(mlp[2]), lr=0.1)
    data = [{"x": x, "label": torch.tensor(i % 3)} for i, x in enumerate(torch.randn(16, 20))]
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[callback])
    with leaves_unchanged(module), pytest.raises(error, match=match):
        trainer.fit(module, DataLoader(data, batch_size=8))


def test_callback_with_missing_files(mlp, saved_finetuned, tmp_path):
    source = mlp[0]  # built before the fit: the callback must leave the module alone too
    with leaves_unchanged(source), pytest.raises(
            FileNotFoundError, match=r"source_finetuned checkpoint '.*nope\.ckpt' does not "
                                     r"exist; give the path"):
        TaskVectorTransport(source, str(tmp_path / "nope.ckpt"))
    missing = str(tmp_path / "no_such_model")
    warm = TaskVectorTransport(missing, saved_finetuned, progress=False)
    _fit_fails(tmp_path, mlp, warm, ValueError,
               r"backbone='.*no_such_model' is neither a packaged name, a timm model nor a folder")


def test_callback_with_a_corrupt_checkpoint(mlp, tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04 broken zip")
    warm = TaskVectorTransport(mlp[0], str(tmp_path / "bad.ckpt"), progress=False)
    _fit_fails(tmp_path, mlp, warm, ValueError, r"could not read checkpoint .*bad\.ckpt")


@pytest.mark.parametrize("attribute,match", [
    ("network", r"MLPModule has no module at target_attribute='network': 'network' is missing; "
                r"the child modules of MLPModule are: model\. Set target_attribute"),
    ("lr", r"MLPModule has no module at target_attribute='lr': 'lr' is missing \(it is a "
           r"float\)"),
    ("model.body", r"no module at target_attribute='model.body': 'model.body' is missing"),
], ids=["missing", "not-a-module", "dotted"])
def test_callback_target_attribute(mlp, saved_finetuned, tmp_path, attribute, match):
    warm = TaskVectorTransport(mlp[0], saved_finetuned, target_attribute=attribute,
                               progress=False)
    _fit_fails(tmp_path, mlp, warm, AttributeError, match)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"alpha": -2.0}, ValueError, r"alpha must be >= 0, got -2.0"),
    ({"alpha": "auto", "alpha_grid": [1.0, float("inf")]}, ValueError,
     r"alpha_grid must be a non-empty list of finite numbers"),
    ({"whiten": 1.0}, ValueError, r"whiten must be a power in \[0, 0.5\], got 1.0"),
    ({"depth_mapping": [0, "1"]}, TypeError, r"depth_mapping entries must be integer block "
                                             r"indices .*1 -> '1'"),
], ids=["alpha", "alpha-grid", "whiten", "depth-entry"])
def test_callback_checks_options_when_built(mlp, saved_finetuned, kwargs, error, match):
    with leaves_unchanged(mlp[0]), pytest.raises(error, match=match):
        TaskVectorTransport(mlp[0], saved_finetuned, **kwargs)
