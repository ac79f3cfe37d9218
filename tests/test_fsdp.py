"""``TaskVectorTransport`` into a target sharded by Lightning's FSDP strategies, 2 CPU processes
(gloo): ``ModelParallelStrategy`` with ``fully_shard`` (FSDP2, DTensor shards) and
``FSDPStrategy`` (FSDP1, flat-parameter shards). Training starts from the same weights, bit for
bit, as the same fit under DDP (same processes, same data shards, nothing sharded): the
callback copies the target whole at setup, runs the engine on that copy filled with the gathered
weights and writes the result back into the shards, in place. A target built in
``configure_model`` cannot be copied before it is sharded: the callback fails at setup.

All fits run in one subprocess (tests/fsdp_run.py) with a timeout, so a deadlock fails the test
instead of hanging it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from warmstart import transport
from warmstart.lightning.sharding import ShardedTarget

from .fsdp_run import TARGET_WIDTH, mlp_case
from .test_dropin import TupleModule, _mlp, _vit

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.fsdp_run", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _weights(run: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(run / f"rank{rank}.pt")


@pytest.mark.parametrize(("phase", "shard_type"), [("fsdp2", "DTensor"), ("fsdp1", "Parameter")])
def test_sharded_target_gets_the_unsharded_weights(runs, phase, shard_type):
    reference = _weights(runs / "ddp", 0)
    torch.manual_seed(1)
    untouched = _vit(TARGET_WIDTH, 2).state_dict()
    assert not torch.equal(reference["net.blocks.1.mlp.fc1.weight"],
                           untouched["blocks.1.mlp.fc1.weight"])  # the transport wrote
    for rank in (0, 1):
        info = json.loads((runs / phase / f"rank{rank}.json").read_text())
        # really sharded: each rank holds about half of the weights, as DTensors (FSDP2) or
        # flat parameters (FSDP1), and the optimizer holds the very parameters written into
        assert info["local_numel"] < 0.6 * info["full_numel"], info
        assert info["param_types"] == [shard_type]
        assert info["optimizer_holds_module_params"]
        weights = _weights(runs / phase, rank)
        assert sorted(weights) == sorted(reference)
        for name, value in reference.items():
            assert torch.equal(weights[name], value), (phase, rank, name)
    report = json.loads((runs / phase / "transport_report.json").read_text())
    expected = json.loads((runs / "ddp" / "transport_report.json").read_text())
    assert report["alpha"] == expected["alpha"]  # alpha='auto' scored on the sharded module
    torch.testing.assert_close(torch.tensor(report["alpha_scores"]),
                               torch.tensor(expected["alpha_scores"]), rtol=1e-6, atol=0)


def test_failed_transport_leaves_the_shards_untouched(runs):
    """An ``alpha='auto'`` trial was written into the shards before a later trial failed."""
    torch.manual_seed(1)
    untouched = _vit(TARGET_WIDTH, 2).state_dict()
    for rank in (0, 1):
        message = (runs / "fail" / f"rank{rank}.txt").read_text()
        assert "is not finite" in message, message
        weights = _weights(runs / "fail", rank)
        assert sorted(weights) == sorted(f"net.{k}" for k in untouched)
        for name, value in untouched.items():
            assert torch.equal(weights[f"net.{name}"], value), (rank, name)


def test_target_built_on_the_meta_device(runs):
    """The copy taken at setup is on the meta device; it gets storage and the gathered weights
    at fit start. The result is the engine's on the materialised weights in one process."""
    before = torch.load(runs / "meta" / "before_rank0.pt")
    assert all(torch.isfinite(v).all() for v in before.values())
    source, finetuned, data = mlp_case()
    expected = _mlp(24)
    expected.load_state_dict({k.removeprefix("net."): v for k, v in before.items()})
    transport(source, finetuned, expected, [x for x, _ in data], progress=False)
    rank0 = _weights(runs / "meta", 0)
    for name, value in expected.state_dict().items():
        assert torch.equal(rank0[f"net.{name}"], _weights(runs / "meta", 1)[f"net.{name}"])
        assert not torch.equal(rank0[f"net.{name}"], before[f"net.{name}"]), name
        # the same sums over the same examples, added in another order
        torch.testing.assert_close(rank0[f"net.{name}"], value, atol=1e-6, rtol=1e-5)


def test_target_built_in_configure_model_fails_at_setup(runs):
    for rank in (0, 1):
        message = (runs / "late" / f"rank{rank}.txt").read_text()
        assert message.startswith("TaskVectorTransport under ModelParallelStrategy:")
        assert "the transport needs the target network at setup" in message
        assert "__init__" in message and "strategy='ddp'" in message
        assert "warmstart transport" in message


def test_target_that_cannot_be_copied_fails_at_setup():
    """A network holding something deepcopy refuses (here a lock, as a network holding a handle
    to a live resource does): the error names the strategy, the network and the way out."""
    net = _mlp(24)
    net.lock = threading.Lock()
    trainer = L.Trainer(accelerator="cpu", devices=2, logger=False,
                        strategy=ModelParallelStrategy(data_parallel_size=2,
                                                       tensor_parallel_size=1))
    with pytest.raises(TypeError, match=r"under ModelParallelStrategy copies the target network "
                                        r"at setup.*Sequential cannot be deep-copied.*ddp"):
        ShardedTarget.at_setup(trainer, TupleModule(net), None)
    single = L.Trainer(accelerator="cpu", devices=1, logger=False)
    assert ShardedTarget.at_setup(single, TupleModule(net), None) is None  # not sharded: no copy
