"""FactGPT-large: FactGPT on a 1000-subject world with a 1024-wide MLP, for mass editing.

MEMIT's protocol rewrites hundreds of distinct subjects at once. The standard FactGPT world
has 300 subjects in a 512-wide layer-0 MLP: 500 rewrites there must hit most subjects twice,
and the measured damage fell on unedited subjects too (key interference, not only
same-subject conflicts). This variant has room for 500 distinct-subject rewrites and twice
the key dimensions. Same architecture and training recipe as FactGPT; about 40 minutes of one
CPU core to train, so tests and `make demo` never train it (benchmarks name it).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from workbench.handle import ModelHandle
from workbench.worlds.factworld import FactWorldConfig
from workbench.zoo import factgpt

VERSION = 1
DEFAULT_SEED = 0
CONFIG = factgpt.FactGPTConfig(
    world=FactWorldConfig(n_subjects=1000, shared_last_words=60),
    vocab_size=4096,  # words stay whole tokens with 1000 two-word names
    d_mlp=1024,
    max_steps=4000,
)


def train(out_dir: str | os.PathLike[str], *, seed: int = DEFAULT_SEED, device: str | torch.device = "cpu",
          progress: bool = True) -> dict[str, Any]:
    info = factgpt.train(out_dir, seed=seed, device=device, progress=progress, config=CONFIG)
    return {**info, "name": "factgpt-large", "d_mlp": CONFIG.d_mlp}


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> ModelHandle:
    return factgpt.load(path, device=device, spec="zoo:factgpt-large")
