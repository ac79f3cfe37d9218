"""``head_fit``: the target's output layer refitted to the finetuned source's outputs."""

from __future__ import annotations

import copy

import pytest
import torch

from warmstart.engine.head_fit import ridge_fit, scale_fit
from warmstart.engine.options import TransportOptions
from warmstart.engine.transport import transport

from .test_transport import TinyCNN, TinyMLP, _calibration, _perturbed, _snapshot, _unchanged

DEFAULT_RIDGE = TransportOptions().head_fit_ridge


def test_ridge_fit_solves_its_normal_equations():
    """The stationarity conditions of ``||F W^T + b - Z||^2 + lam ||W||^2``: the residual sums to
    zero (``b`` is not penalised) and ``F^T R + lam W^T = 0``; a vanishing ridge gives the least
    squares solution."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(50, 7, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 7)
    z = torch.randn(50, 4, generator=g, dtype=torch.float64)
    for ridge in (0.3, 2.0):
        w, b = ridge_fit(f, z, ridge)
        lam = ridge * float((f * f).sum(0).mean())
        residual = f @ w.T + b - z
        torch.testing.assert_close(residual.sum(0), torch.zeros(4, dtype=f.dtype), atol=1e-10,
                                   rtol=0)
        torch.testing.assert_close(f.T @ residual + lam * w.T, torch.zeros(7, 4, dtype=f.dtype),
                                   atol=1e-9, rtol=0)
    w, b = ridge_fit(f, z, 1e-12)
    x = torch.cat([f, torch.ones(50, 1, dtype=f.dtype)], 1)
    expected = torch.linalg.lstsq(x, z).solution.T
    torch.testing.assert_close(torch.cat([w, b[:, None]], 1), expected, atol=1e-8, rtol=0)
    w_only, none = ridge_fit(f, z, 1e-12, bias=False)
    assert none is None
    torch.testing.assert_close(w_only, torch.linalg.lstsq(f, z).solution.T, atol=1e-8, rtol=0)


def test_head_fit_recovers_the_finetuned_head_on_its_own_features():
    """Source and target identical: the body receives the task vector itself, so the target's
    features are the finetuned source's, and the fit (almost no ridge) finds the finetuned head."""
    source = TinyMLP()
    finetuned = _perturbed(source, scale=0.2)
    target = copy.deepcopy(source)
    source_before = _snapshot(source)
    transport(source, finetuned, target, _calibration(), head_fit=2, head_fit_ridge=1e-10,
              progress=False)
    torch.testing.assert_close(target.head.weight, finetuned.head.weight, atol=1e-4, rtol=0)
    torch.testing.assert_close(target.head.bias, finetuned.head.bias, atol=1e-4, rtol=0)
    assert _unchanged(source, source_before)  # run with the finetuned tensors, not changed


def test_head_fit_brings_a_wider_target_closer_to_the_source_outputs():
    """Across widths the refitted head reproduces the finetuned source's outputs on the
    calibration batches better than the moved head does, and only the output layer differs."""
    torch.manual_seed(0)
    source, target = TinyMLP(hidden=16, d_out=6), TinyMLP(hidden=24, d_out=9)
    finetuned = _perturbed(source, scale=0.3)
    calibration = _calibration(4)
    moved, refit = copy.deepcopy(target), copy.deepcopy(target)
    transport(source, finetuned, moved, calibration, alpha=2.0, progress=False)
    report = transport(source, finetuned, refit, calibration, alpha=2.0, head_fit=4,
                       progress=False)
    assert report.options["head_fit"] == 4 and report.options["head_fit_ridge"] == DEFAULT_RIDGE
    x = torch.cat(calibration)
    with torch.no_grad():
        wanted = finetuned(x)
        error_moved = float((moved(x) - wanted).square().mean())
        error_refit = float((refit(x) - wanted).square().mean())
    assert error_refit < 0.5 * error_moved
    fit = report.head_fit  # what the refit did, on the calibration rows
    assert fit["mode"] == "ridge" and fit["rows"] == float(len(x))
    assert fit["logit_mse_before"] == pytest.approx(error_moved, rel=1e-5)
    assert fit["logit_mse_after"] == pytest.approx(error_refit, rel=1e-5)
    assert report.summary()["head_fit_logit_mse_after"] == fit["logit_mse_after"]
    for name, value in refit.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, moved.state_dict()[name]), name


def test_scale_fit_matches_the_spread_and_keeps_every_decision():
    """``scale_fit``: ``c`` is the least-squares scale of the centred logits (checked against a
    scan of candidate scales), the argmax of every row is kept, a single output is not centred,
    and opposed logits are refused."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(40, 6, generator=g, dtype=torch.float64)
    w, b = torch.randn(3, 6, generator=g), torch.randn(3, generator=g)
    own = f @ w.double().T + b.double()
    wanted = 2.5 * own + torch.randn(40, 1, generator=g, dtype=torch.float64)  # row shifts
    wanted += 0.3 * torch.randn(40, 3, generator=g, dtype=torch.float64)
    w2, b2 = scale_fit(f, wanted, w, b)
    c = float(w2[0, 0] / w[0, 0])
    torch.testing.assert_close(w2, c * w.double())
    torch.testing.assert_close(b2, c * b.double())

    def centred_error(k):
        d = k * own - wanted
        return float((d - d.mean(1, keepdim=True)).square().sum())

    assert 2.3 < c < 2.7
    assert centred_error(c) <= min(centred_error(c + e) for e in (-1e-3, 1e-3))
    assert torch.equal((f @ w2.T + b2).argmax(1), own.argmax(1))
    one_w, one_b = w[:1], b[:1]
    single = f @ one_w.double().T + one_b.double()
    w1, _ = scale_fit(f, 0.5 * single + 1.0, one_w, one_b)  # not centred: the shift counts
    expected = float((single * (0.5 * single + 1.0)).sum() / single.square().sum())
    torch.testing.assert_close(w1, expected * one_w.double())
    with pytest.raises(ValueError, match=r"head_fit_mode='scale' found the target's logits "
                                         r"unrelated or opposed .* nothing was written"):
        scale_fit(f, -own, w, b)


def test_head_fit_scale_mode_multiplies_the_moved_head_only():
    """``head_fit_mode="scale"`` through transport(): the output layer is the moved one times the
    scale fitted between its logits and the finetuned source's on the calibration batches; every
    other tensor is as without head_fit, and the target's predictions are unchanged."""
    torch.manual_seed(0)
    source, target = TinyMLP(hidden=16, d_out=6), TinyMLP(hidden=24, d_out=6)
    finetuned = _perturbed(source, scale=0.3)
    calibration = _calibration(3)
    moved, scaled = copy.deepcopy(target), copy.deepcopy(target)
    transport(source, finetuned, moved, calibration, progress=False)
    report = transport(source, finetuned, scaled, calibration, head_fit=3,
                       head_fit_mode="scale", progress=False)
    for name, value in scaled.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(value, moved.state_dict()[name]), name
    x = torch.cat(calibration)
    features = []
    hook = moved.head.register_forward_hook(lambda m, i, o: features.append(i[0]))
    with torch.no_grad():
        logits = moved(x)
        wanted = finetuned(x)
    hook.remove()
    w, b = scale_fit(features[0], wanted, moved.head.weight, moved.head.bias)
    torch.testing.assert_close(scaled.head.weight, w.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scaled.head.bias, b.float(), atol=1e-6, rtol=1e-5)
    scale = float(w[0, 0] / moved.head.weight[0, 0])
    assert abs(scale - 1.0) > 0.05  # it did rescale
    assert report.head_fit["scale"] == pytest.approx(scale, rel=1e-5)
    assert report.head_fit["logit_mse_after"] < report.head_fit["logit_mse_before"]
    with torch.no_grad():
        assert torch.equal(scaled(x).argmax(1), logits.argmax(1))


def test_head_fit_reads_the_features_after_batchnorm_recalibration():
    """With ``bn_recalibration`` the head is fitted to the features of the recalibrated network,
    in eval mode: the refit is exactly the ridge solution on those features."""
    torch.manual_seed(0)
    source, target = TinyCNN(8), TinyCNN(12)
    finetuned = _perturbed(source, scale=0.2)
    images = [torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(i))
              for i in range(3)]
    transport(source, finetuned, target, images, bn_recalibration=3, head_fit=3,
              progress=False)
    assert target.training  # the flags are put back
    target.eval()
    with torch.no_grad():
        x = torch.cat(images)
        features = torch.relu(target.bn(target.conv(x))).mean((2, 3))
        w, b = ridge_fit(features, finetuned.eval()(x), DEFAULT_RIDGE)
    torch.testing.assert_close(target.head.weight, w.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(target.head.bias, b.float(), atol=1e-5, rtol=1e-4)


def test_head_fit_under_alpha_auto_fits_each_trial():
    """``alpha="auto"`` scores every strength with its own refitted head and keeps the best."""
    torch.manual_seed(0)
    source, target = TinyMLP(hidden=16), TinyMLP(hidden=24)
    finetuned = _perturbed(source, scale=0.3)
    calibration = _calibration(3)
    x = torch.cat(calibration)
    wanted = finetuned(x).detach()

    def loss(model):
        with torch.no_grad():
            return float((model(x) - wanted).square().mean())

    auto = copy.deepcopy(target)
    report = transport(source, finetuned, auto, calibration, alpha="auto", alpha_grid=(0.5, 2.0),
                       evaluate=loss, head_fit=3, progress=False)
    fixed = copy.deepcopy(target)
    transport(source, finetuned, fixed, calibration, alpha=report.alpha, head_fit=3,
              progress=False)
    assert dict(report.alpha_scores)[report.alpha] == pytest.approx(loss(fixed), rel=1e-6)
    for name, value in auto.state_dict().items():
        torch.testing.assert_close(value, fixed.state_dict()[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("options, match", [
    (dict(head_fit=-1), r"head_fit must be a number of batches >= 0, got -1"),
    (dict(head_fit=1.5), r"head_fit must be a number of batches >= 0, got 1.5"),
    (dict(head_fit=1, head_fit_ridge=0.0), r"head_fit_ridge must be a finite number > 0"),
    (dict(head_fit=1, head_fit_ridge=float("nan")), r"head_fit_ridge must be a finite number"),
    (dict(head_fit=1, head_fit_mode="temperature"),
     r"head_fit_mode must be one of \('ridge', 'scale'\), got 'temperature'"),
], ids=["negative", "fraction", "zero-ridge", "nan-ridge", "mode"])
def test_bad_head_fit_options_are_refused(options, match):
    source, target = TinyMLP(), TinyMLP()
    before = _snapshot(target)
    with pytest.raises(ValueError, match=match):
        transport(source, _perturbed(source), target, _calibration(1), progress=False, **options)
    assert _unchanged(target, before)


def test_head_fit_errors_leave_the_target_untouched():
    source, target = TinyCNN(), TinyCNN()
    before = _snapshot(target)
    with pytest.raises(ValueError, match=r"head_fit needs calibration inputs"):
        transport(source, _perturbed(source), target, None, method="slice", head_fit=1,
                  progress=False)
    # the source's outputs are read before anything is written ...
    with pytest.raises(ValueError, match=r"calibration batch 0 does not fit the source model"):
        transport(source, _perturbed(source), target, [torch.randn(4, 5, 8, 8)],
                  method="slice", head_fit=1, progress=False)
    # ... the target's features after the write, which a failure there undoes
    good = [torch.randn(4, 3, 8, 8)]
    bad_target = [torch.randn(4, 5, 8, 8)]
    with pytest.raises(ValueError, match=r"calibration batch 0 does not fit the target model"):
        transport(source, _perturbed(source), target, good, target_calibration=bad_target,
                  method="slice", head_fit=1, progress=False)
    generator = (torch.randn(8, 3, 8, 8) for _ in range(2))  # used up by the statistics
    with pytest.raises(ValueError, match="head_fit got no batches: .* not a generator"):
        transport(source, _perturbed(source), target, generator, head_fit=1, progress=False)
    assert _unchanged(target, before)


def test_head_fit_on_hugging_face_classifiers_refits_only_the_output_layer():
    """BERT -> MPNet sequence classifiers fed keyword batches: MPNet's two-layer head keeps its
    moved ``dense`` layer, and ``out_proj`` becomes the ridge fit of BERT's finetuned logits
    (``.logits`` of its output) on ``out_proj``'s inputs."""
    from .test_hf_heads import _bert, _finetuned, _mpnet
    from .test_hf_heads import _calibration as _text

    source, target = _bert(), _mpnet()
    finetuned = _finetuned(source)
    batches = _text(3)
    moved, refit = copy.deepcopy(target), copy.deepcopy(target)
    transport(source, finetuned, moved, batches, progress=False)
    transport(source, finetuned, refit, batches, head_fit=3, progress=False)
    for name, value in refit.state_dict().items():
        if not name.startswith("classifier.out_proj."):
            assert torch.equal(value, moved.state_dict()[name]), name
    features = []
    hook = refit.classifier.out_proj.register_forward_hook(
        lambda m, i, o: features.append(i[0]))
    with torch.no_grad():
        logits = torch.cat([finetuned(**b).logits for b in batches])
        for b in batches:
            refit(**b)
    hook.remove()
    w, b = ridge_fit(torch.cat(features), logits, DEFAULT_RIDGE)
    torch.testing.assert_close(refit.classifier.out_proj.weight, w.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(refit.classifier.out_proj.bias, b.float(), atol=1e-5, rtol=1e-4)


def test_head_fit_without_a_task_head_names_the_problem():
    """A backbone without a classifier (timm ``num_classes=0``) has no output layer to refit."""
    import timm

    def vit(width, depth, seed):
        torch.manual_seed(seed)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                 patch_size=8, embed_dim=width, depth=depth,
                                 num_heads=width // 16, num_classes=0).eval()

    source, target = vit(32, 2, 0), vit(48, 2, 1)
    before = _snapshot(target)
    images = [torch.randn(4, 3, 32, 32)]
    with pytest.raises(ValueError, match=r"head_fit needs a task head that ends in one "
                                         r"nn.Linear; the source .* has head weights none"):
        transport(source, _perturbed(source, 0.01), target, images, head_fit=1, progress=False)
    assert _unchanged(target, before)


def test_head_fit_through_the_callback_on_hugging_face_dict_batches(tmp_path):
    """A user's module holding an ``AutoModelForSequenceClassification`` fed dict batches with
    ``labels``: ``options={"head_fit": 3}`` refits the classifier at fit start and changes
    nothing else against the same warm start without it."""
    from warmstart import TaskVectorTransport

    from .test_dropin import HFModule, _bert, _finetuned_source, _token_data, _trainer

    source, checkpoint = _finetuned_source(tmp_path, HFModule, lambda: _bert(16), _token_data)
    states = {}
    for n_fit in (0, 3):
        torch.manual_seed(1)
        module = HFModule(_bert(24))
        warm = TaskVectorTransport(source, checkpoint, target_attribute="model",
                                   calibration_batches=3, progress=False,
                                   options={"head_fit": n_fit})
        _trainer(tmp_path / f"run{n_fit}", [warm], max_steps=0).fit(module, _token_data())
        assert warm.report.options["head_fit"] == n_fit
        states[n_fit] = module.state_dict()
    changed = {k for k, v in states[3].items() if not torch.equal(v, states[0][k])}
    assert changed == {"model.classifier.weight", "model.classifier.bias"}
