"""Test-wide settings: offline hubs, no network, quiet and deterministic CPU runs."""

from __future__ import annotations

import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

_real_connect = socket.socket.connect


def _loopback_only(sock, address):
    host = address[0] if isinstance(address, tuple) else address
    if sock.family == socket.AF_UNIX or str(host) in ("localhost", "::1") or \
            str(host).startswith("127."):
        return _real_connect(sock, address)
    raise RuntimeError(f"a test tried to reach the network ({address!r}); tests run offline.")


socket.socket.connect = _loopback_only


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
