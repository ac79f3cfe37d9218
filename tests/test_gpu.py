"""The transport and the callback with models on a CUDA device.

These run only where torch sees a GPU (the accelerator machine); CI is CPU-only, so there they
are skipped with the reason below. Run them with ``pytest -m gpu``.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import lightning as L
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from warmstart.engine.transport import transport
from warmstart.lightning.callbacks import TaskVectorTransport

from .test_bad_inputs import leaves_unchanged
from .test_callbacks import MLPModule, _task
from .test_real_pairs import tiny_vit, with_task_vector
from .test_transport import TinyMLP, _calibration, _perturbed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (the accelerator machine); CI runs on CPU"),
]

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def vit_pair():
    """Tiny timm ViTs of different width and depth (48 x 3 -> 64 x 5), on the CPU."""
    source, target = tiny_vit(48, 3, 32, seed=0), tiny_vit(64, 5, 40, seed=1)
    finetuned = with_task_vector(source, seed=2, scale=1e-2)
    gen = torch.Generator().manual_seed(3)
    calibration = list(torch.randn(48, 3, 32, 32, generator=gen).split(16))
    return source, finetuned, target, calibration


def _on(device, *models: nn.Module) -> list[nn.Module]:
    return [copy.deepcopy(m).to(device) for m in models]


def _delta(after: nn.Module, before: nn.Module) -> dict[str, torch.Tensor]:
    b = before.state_dict()
    return {k: (v.double().cpu() - b[k].double().cpu()) for k, v in after.state_dict().items()
            if v.is_floating_point()}


@contextmanager
def tf32(enabled: bool):
    """Set cuDNN's TF32 convolutions (on by default in torch) and TF32 matmuls (off by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _largest_gap(a: nn.Module, b: nn.Module, base: nn.Module) -> tuple[str, float]:
    """The parameter whose update (from ``base``) differs most between ``a`` and ``b``,
    relative to the norm of ``b``'s update."""
    da, db = _delta(a, base), _delta(b, base)
    assert da.keys() == db.keys()
    gaps = {k: float((da[k] - db[k]).norm()) / max(float(db[k].norm()), 1e-12) for k in db}
    worst = max(gaps, key=gaps.get)
    return worst, gaps[worst]


def _function_gap(a: nn.Module, b: nn.Module, base: nn.Module) -> float:
    """||f_a - f_b|| / ||f_b - f_base|| on held-out images, evaluated on the CPU in float32."""
    x = torch.randn(32, 3, 40, 40, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        fa, fb, f0 = (copy.deepcopy(m).cpu().float()(x) for m in (a, b, base))
    return float((fa - fb).norm() / (fb - f0).norm())


@pytest.mark.parametrize("use_tf32, param_tol, function_tol",
                         [(False, 5e-3, 5e-3), (True, None, 0.1)], ids=["fp32", "tf32-default"])
def test_gpu_transport_matches_the_cpu_transport(vit_pair, use_tf32, param_tol, function_tol):
    """Statistics and SVDs run on the GPU in float64, but the forward passes that feed them are
    float32 (or TF32, torch's default for convolutions on this GPU, here the patch embedding),
    with other summation orders than the CPU's. The maps' weakly determined directions (small
    singular values of the cross moment) pick that up: in float32 the updates agree to a few
    1e-4 of their norm; with TF32 single biases move by tens of percent, but the transported
    model computes nearly the same function. Measured on an H100 (printed with ``-s``): float32
    update gap 6.6e-4, function gap 4.9e-5; TF32 update gap 0.22 (a qkv bias), function gap
    7.3e-3."""
    source, finetuned, target, calibration = vit_pair
    on_cpu = copy.deepcopy(target)
    cpu_report = transport(source, finetuned, on_cpu, calibration, progress=False)
    s, f, on_gpu = _on(CUDA, source, finetuned, target)
    with tf32(use_tf32):
        gpu_report = transport(s, f, on_gpu, calibration, progress=False)  # batches on the CPU
    assert all(p.device.type == "cuda" for p in on_gpu.parameters())
    assert (cpu_report.options["solver"], gpu_report.options["solver"]) == ("svd", "eigh")
    worst, gap = _largest_gap(on_gpu, on_cpu, target)
    function_gap = _function_gap(on_gpu, on_cpu, target)
    print(f"GPU vs CPU, tf32={use_tf32}: largest relative update gap {gap:.2e} ({worst}), "
          f"function gap {function_gap:.2e}")
    if param_tol is not None:
        assert gap <= param_tol, (worst, gap)
    assert function_gap <= function_tol
    # the numerical rank counts singular values above 1e-6 of the largest: TF32 noise can move
    # one across that line (seen: attn_k rank 47 on the GPU, 48 on the CPU)
    rank_slack = 1 if use_tf32 else 0
    for a, b in zip(cpu_report.maps, gpu_report.maps):
        assert a.target_space == b.target_space
        assert abs(a.rank - b.rank) <= rank_slack, (a.target_space, a.rank, b.rank)
        assert a.residual == pytest.approx(b.residual, rel=1e-2, abs=1e-6)


def test_gpu_solvers_agree(vit_pair):
    """On the GPU, from the same statistics, the polished eigendecomposition (the default there)
    and the SVD give the same ranks and nearly the same update."""
    source, finetuned, target, calibration = vit_pair
    s, f, by_svd = _on(CUDA, source, finetuned, target)
    by_eigh = copy.deepcopy(by_svd)
    svd_report = transport(s, f, by_svd, calibration, solver="svd", progress=False)
    eigh_report = transport(s, f, by_eigh, calibration, progress=False)
    assert eigh_report.options["solver"] == "eigh"
    assert [m.rank for m in svd_report.maps] == [m.rank for m in eigh_report.maps]
    worst, gap = _largest_gap(by_eigh, by_svd, target)
    print(f"GPU eigh vs GPU svd: largest relative update gap {gap:.2e} ({worst})")
    assert gap < 1e-4, (worst, gap)


def test_source_on_cpu_target_on_gpu(vit_pair):
    """Mixed devices: each model gets the calibration on its own device (batches given on the
    GPU here) and the source's rows are moved to the target's device. The result equals the
    all-GPU one up to the float32 differences of the source's forward passes (see above)."""
    source, finetuned, target, calibration = vit_pair
    with tf32(False):
        s, f, all_gpu = _on(CUDA, source, finetuned, target)
        transport(s, f, all_gpu, calibration, progress=False)
        (mixed,) = _on(CUDA, target)
        transport(source, finetuned, mixed, [b.to(CUDA) for b in calibration], progress=False)
    assert all(p.device.type == "cuda" for p in mixed.parameters())
    worst, gap = _largest_gap(mixed, all_gpu, target)
    function_gap = _function_gap(mixed, all_gpu, target)
    print(f"mixed vs all on the GPU: largest relative update gap {gap:.2e} ({worst}), "
          f"function gap {function_gap:.2e}")
    assert gap <= 5e-3, (worst, gap)
    assert function_gap <= 5e-3


def test_gpu_transport_is_repeatable(vit_pair):
    """Two transports of the same inputs on the same GPU give the same bits."""
    source, finetuned, target, calibration = vit_pair
    results = []
    for _ in range(2):
        s, f, t = _on(CUDA, source, finetuned, target)
        transport(s, f, t, calibration, progress=False)
        results.append(t.state_dict())
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_gpu_target_is_cast_once(dtype):
    """A half-precision target on the GPU: theta + alpha * delta in float64, cast once (with
    ``slice``, which needs no statistics, bit-equal to the float64 result on the CPU cast)."""
    source = TinyMLP()
    tuned = _perturbed(source)
    base = TinyMLP(hidden=24)
    source_gpu, tuned_gpu = _on(CUDA, source, tuned)
    half = copy.deepcopy(base).to(CUDA, dtype)
    wide = copy.deepcopy(base).to(dtype).double()
    transport(source_gpu, tuned_gpu, half, method="slice", alpha=1.5, progress=False)
    transport(source, tuned, wide, method="slice", alpha=1.5, progress=False)
    for name, value in half.state_dict().items():
        assert (value.dtype, value.device.type) == (dtype, "cuda"), name
        assert torch.equal(value.cpu(), wide.state_dict()[name].to(dtype)), name
    # with maps estimated from half-precision activations on the GPU: finite and close to the
    # float32 transport
    half, single = copy.deepcopy(base).to(CUDA, dtype), copy.deepcopy(base).to(CUDA)
    for model in (half, single):
        transport(source_gpu, tuned_gpu, model, _calibration(2), alpha=1.5, progress=False)
    start = base.state_dict()
    for name, value in half.state_dict().items():
        reference = single.state_dict()[name].cpu()
        moved = (reference - start[name]).norm()
        assert torch.isfinite(value).all(), name
        assert (value.float().cpu() - reference).norm() <= 0.05 * moved, name


def test_failed_gpu_transport_leaves_the_target_unchanged(vit_pair):
    source, finetuned, target, calibration = vit_pair
    s, f, t = _on(CUDA, source, finetuned, target)
    bad = [*calibration[:-1], torch.full_like(calibration[-1], float("nan"))]
    with leaves_unchanged(t), pytest.raises(ValueError, match="contain NaN or Inf"):
        transport(s, f, t, bad, progress=False)


def test_callback_in_a_gpu_fit(tmp_path):
    """TaskVectorTransport in a real Lightning fit on the GPU: the source checkpoint is read on
    the CPU, the target is on the GPU when ``on_fit_start`` runs, and training goes on."""
    torch.manual_seed(0)
    base = TinyMLP()
    tuned = _perturbed(base, scale=0.1)
    path = tmp_path / "finetuned.safetensors"
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(path))
    torch.manual_seed(1)
    module = MLPModule(TinyMLP(hidden=24))
    before = copy.deepcopy(module.model)

    class Seen(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.devices = {p.device.type for p in pl_module.parameters()}
            self.fc1 = pl_module.model.fc1.weight.detach().cpu().clone()

    callback = TaskVectorTransport(base, str(path), calibration_batches=4, progress=False)
    seen = Seen()
    trainer = L.Trainer(max_steps=3, accelerator="gpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path, callbacks=[callback, seen])
    train = DataLoader(_task(256, 0), batch_size=64)
    trainer.fit(module, train)
    assert callback.applied and callback.report is not None
    assert all(m.determined for m in callback.report.maps)
    assert seen.devices == {"cuda"}
    assert not torch.equal(seen.fc1, before.fc1.weight)  # transported before the first step
    assert trainer.global_step == 3
