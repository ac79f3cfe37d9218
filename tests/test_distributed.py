"""Statistics are all-reduced across ranks: two CPU processes (gloo) end with identical weights,
equal to one process that saw all the calibration batches; directly through the engine, and
through a real ``Trainer(strategy="ddp_spawn")`` fit with the callback."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from warmstart.engine.transport import transport

from .test_dropin import TupleModule, _mlp
from .test_transport import TinyMLP, _calibration, _perturbed

REPO = Path(__file__).resolve().parent.parent


def _models():
    torch.manual_seed(0)
    source = TinyMLP()
    finetuned = _perturbed(source)
    torch.manual_seed(1)
    target = TinyMLP(hidden=24, d_out=9)
    return source, finetuned, target


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        source, finetuned, target = _models()
        shard = _calibration(n_batches=8)[rank::world_size]  # each rank sees its own batches
        transport(source, finetuned, target, shard, progress=False)
        torch.save(target.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_each_other_and_a_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    source, finetuned, target = _models()
    untouched = copy.deepcopy(target.state_dict())
    transport(source, finetuned, target, _calibration(n_batches=8), progress=False)
    for name, value in target.state_dict().items():
        assert torch.equal(rank0[name], rank1[name]), name  # bit-identical across ranks
        # Same sums, added in another order: equal to float32 rounding.
        torch.testing.assert_close(rank0[name], value, atol=1e-6, rtol=1e-5)
    assert not torch.equal(rank0["fc1.weight"], untouched["fc1.weight"])


def _fit(out: Path, devices: int, prime_steps: int = 0) -> None:
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "tests.ddp_run", "--out", str(out),
                           "--devices", str(devices), "--prime_steps", str(prime_steps)],
                          cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # a deadlock fails here instead of hanging
    assert done.returncode == 0, done.stderr[-3000:]


def test_ddp_spawn_through_the_trainer(tmp_path):
    """``TaskVectorTransport`` under ``Trainer(strategy="ddp_spawn", devices=2)``: no hang, ranks
    bit-identical, equal to one process on the same calibration examples."""
    _fit(tmp_path / "ddp", devices=2)
    _fit(tmp_path / "single", devices=1)
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    rank1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    single = torch.load(tmp_path / "single" / "rank0.pt")
    torch.manual_seed(1)
    untouched = TupleModule(_mlp(24)).state_dict()
    for name, value in single.items():
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], value, atol=1e-6, rtol=1e-5)
    assert not torch.equal(rank0["net.0.weight"], untouched["net.0.weight"])
    for run in ("ddp", "single"):  # the tracker under DDP: rank 0 writes the module's metrics
        curve = (tmp_path / run / "curve.csv").read_text().splitlines()
        assert curve[0] == "step,seconds,metric,value"
        assert {line.split(",")[0] for line in curve[1:]} == {"0", "1"}
        assert {line.split(",")[2] for line in curve[1:]} == {"val_loss", "val_accuracy"}


def test_prime_steps_under_ddp_spawn_give_every_rank_the_same_moments(tmp_path):
    """``prime_steps`` under ``ddp_spawn``: each rank primes on its own shard through the
    strategy's backward, so the gradients are all-reduced and the moments, then the first
    step's weights, are bit-identical across ranks."""
    out = tmp_path / "ddp"
    _fit(out, devices=2, prime_steps=2)
    for name in ("rank{}_moments.pt", "rank{}_step1.pt"):
        rank0, rank1 = (torch.load(out / name.format(r)) for r in (0, 1))
        assert rank0.keys() == rank1.keys() and rank0
        for key, value in rank0.items():
            assert torch.equal(value, rank1[key]), (name, key)
    moments = torch.load(out / "rank0_moments.pt")
    assert all(float(v.abs().max()) > 0 for v in moments.values())
