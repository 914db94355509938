#!/usr/bin/env bash
# Build the separate environment for benchmarks against peers that need torchvision
# (torch-lucent, torchattacks). Never install these into the project's own .venv:
# torchvision breaks `transformers` there (see DESIGN.md).
#
#   bash benchmarks/setup_peers.sh            # creates benchmarks/.venv-peers (git-ignored)
#   benchmarks/.venv-peers/bin/python benchmarks/bench_featvis.py
#
# torch 2.14.1 + torchvision 0.29.1 import together (a CUDA build, ~5.5 GB). torch-lucent
# 0.1.8 pins kornia<=0.4.1 (which wants an old torch), so it goes in with --no-deps and its
# runtime deps are installed by hand; the benchmark adapts to kornia's newer API.
# The workbench itself goes in with --no-deps (no transformers there); the image side only
# needs safetensors, numpy, matplotlib and tqdm. Other peers append their lines below.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
venv="${PEERS_VENV:-$here/.venv-peers}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" "torch==2.14.1" "torchvision==0.29.1"
"${pip[@]}" safetensors numpy matplotlib tqdm pillow pytest
"${pip[@]}" --no-deps -e "$root"
# torch-lucent (feature visualization peer); kornia for its transforms
"${pip[@]}" --no-deps "torch-lucent==0.1.8"
"${pip[@]}" kornia decorator future ipython
# --- other peers below this line ---
# torchattacks 3.5.1 (PGD peer for bench_attacks.py); --no-deps so it cannot move torch,
# then its small runtime deps (scipy, requests)
"${pip[@]}" --no-deps "torchattacks==3.5.1"
"${pip[@]}" scipy requests
# SAELens 6.54.12 (dictionary format and training-step peer: tests/workbench/dictionaries/test_saelens_interop.py,
# bench_sae_training.py); it brings transformer-lens, wandb and their dependencies, so it lives here, not in .venv
"${pip[@]}" "sae-lens==6.54.12"
echo "peer venv ready: $venv"
"$venv/bin/python" -c "import torch, torchvision, lucent; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'lucent ok')"
