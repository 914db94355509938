"""Fixtures for circuit tests: prompt pairs for the tiny word-level models, a GPT-2 with a planted
head, and a linear CNN whose patching effects attribution must reproduce exactly."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from tests.conftest import build_tiny
from workbench.circuits import CircuitTask, ClassLogit
from workbench.handle import Architecture, ImagePreprocess, ModelHandle
from workbench.models import wrap_hf_model

# Each pair differs before its last token, so information must move between positions (attention).
PAIRS = [
    {"clean": "the capital of paris is", "corrupted": "the capital of rome is", "answer": "quenn", "corrupted_answer": "berlin"},
    {"clean": "the river of vel is", "corrupted": "the river of oran is", "answer": "north", "corrupted_answer": "south"},
    {"clean": "the city of tal is", "corrupted": "the city of mira is", "answer": "red", "corrupted_answer": "blue"},
    {"clean": "a dog is in the red city", "corrupted": "a cat is in the red city", "answer": "one", "corrupted_answer": "two"},
    {"clean": "the language spoken in rome is", "corrupted": "the language spoken in berlin is", "answer": "east",
     "corrupted_answer": "west"},
    {"clean": "the fox jumps over the lazy dog", "corrupted": "the cat jumps over the lazy dog", "answer": "three",
     "corrupted_answer": "four"},
]

PLANTED_LAYER, PLANTED_HEAD = 1, 2


@pytest.fixture
def planted_gpt2() -> ModelHandle:
    """A tiny random GPT-2 in which only head a1.h2 writes into the residual stream: every other head's
    rows of the output projection are zero, so it is the one path from the subject to the last token."""
    model, tok = build_tiny("gpt2", seed=3)
    n_heads = model.config.n_head
    d_head = model.config.n_embd // n_heads
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h):
            for head in range(n_heads):
                if (layer, head) != (PLANTED_LAYER, PLANTED_HEAD):
                    block.attn.c_proj.weight[head * d_head:(head + 1) * d_head] = 0.0
        model.transformer.h[PLANTED_LAYER].attn.c_proj.weight[PLANTED_HEAD * d_head:(PLANTED_HEAD + 1) * d_head] *= 8.0
    return wrap_hf_model(model, tok, spec="test:planted-gpt2", kind="causal_lm")


class LinearCNN(nn.Module):
    """Two convolutions, average pooling and a linear head, no nonlinearity: the metric is linear in every
    channel, so first-order attribution is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.conv2(self.conv1(x))).flatten(1))


@pytest.fixture
def linear_cnn_task() -> Callable[[], tuple[ModelHandle, CircuitTask]]:
    def make() -> tuple[ModelHandle, CircuitTask]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            model = LinearCNN().eval()
            clean, corrupted = torch.rand(6, 3, 8, 8), torch.rand(6, 3, 8, 8)
        handle = ModelHandle(spec="test:linear-cnn", model=model, kind="image_classifier",
                             arch=Architecture(family="cnn", n_layers=2),
                             preprocess=ImagePreprocess(height=8, width=8, class_names=("a", "b", "c")))
        return handle, CircuitTask("linear", clean, corrupted, ClassLogit(1))

    return make
