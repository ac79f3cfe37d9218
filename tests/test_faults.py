"""Faults: a fit killed (SIGKILL) during the transport or during training, then resumed from the
last checkpoint, ends with the weights of an uninterrupted fit, and the transport ran exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .test_callbacks import source_pair  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parent.parent


def _run(root: Path, base: str, finetuned: str, kill: str = "none") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "tests.fault_run", "--root", str(root), "--base", base,
         "--finetuned", finetuned, "--kill", kill],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _transports(root: Path) -> int:
    log = root / "transports.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture(scope="module")
def paths(source_pair, tmp_path_factory):  # noqa: F811
    base, finetuned = source_pair
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(path))
    return str(path), finetuned


@pytest.fixture(scope="module")
def uninterrupted(paths, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    done = _run(root, *paths)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _transports(root) == 1
    return load_file(str(root / "final.safetensors"))


@pytest.mark.parametrize("kill, checkpointed", [("transport", False), ("epoch1", True),
                                                ("epoch2", True)])
def test_killed_fit_resumes_to_the_uninterrupted_weights(tmp_path, paths, uninterrupted, kill,
                                                         checkpointed):
    killed = _run(tmp_path, *paths, kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "final.safetensors").exists()
    assert (tmp_path / "ckpt" / "last.ckpt").exists() == checkpointed
    resumed = _run(tmp_path, *paths)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _transports(tmp_path) == 1  # applied once over the killed and the resumed process
    final = load_file(str(tmp_path / "final.safetensors"))
    assert final.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(final[name], value), name
