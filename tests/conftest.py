"""Shared fixtures: tiny random transformers saved to disk and loaded back, and a small CNN.

Each family (GPT-2, GPT-NeoX, Llama, BERT) is built from a 2-layer, 32-wide config with a
fixed seed, saved with `save_pretrained(safe_serialization=True)` next to a tiny
word-level tokenizer, and loaded through `workbench.models.load`, the public loader, so
tests exercise the same path a user's checkpoint takes.

    tiny_model_dirs   session: {family: folder}
    load_tiny         function: family -> fresh ModelHandle (float32, CPU, eval mode)
    tiny_lm           parametrized over the four families: a fresh ModelHandle
    small_cnn         a small residual-free CNN (nn.Module), seeded
    cnn_handle        that CNN as an image-classifier ModelHandle (16x16 RGB in [0, 1])
    quick_run         session: one `workbench reproduce --quick --seeds 2` of every case study,
                      shared by the study tests (tests/test_studies*.py)
    gray_cnn_handle   another input size, channel count, range and normalization: a seeded
                      CNN on 1x20x28 images in [-1, 1] with its normalization inside (4 classes)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.study_runs import reproduce
from workbench.handle import Architecture, ImagePreprocess, ModelHandle

FAMILIES = ("gpt2", "gpt_neox", "llama", "bert")
D_MODEL = 32
VOCAB = 96
WORDS = (
    "the a of is in to and capital city river country language spoken born works for "
    "paris rome berlin quenn vel oran tal mira north south east west red blue green cat dog "
    "fox quick brown jumps over lazy one two three four five six seven eight nine ten"
).split()


@pytest.fixture(autouse=True)
def _statistics_memory_per_test() -> None:
    """Each test starts with no statistics kept in memory, so a cache hit is one the test made."""
    from workbench.statistics import forget_all

    forget_all()


def _tokenizer(family: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]", "[CLS]", "[SEP]"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = None
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    names = ["input_ids", "token_type_ids", "attention_mask"] if family == "bert" else ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
        mask_token="[MASK]", cls_token="[CLS]", sep_token="[SEP]",
        model_input_names=names,
    )


def _model(family: str) -> nn.Module:
    import transformers as tf

    common = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if family == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=D_MODEL, n_head=4, n_positions=64, **common)
        return tf.GPT2LMHeadModel(cfg)
    if family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, **common)
        return tf.GPTNeoXForCausalLM(cfg)
    if family == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=64, **common)
        return tf.LlamaForCausalLM(cfg)
    if family == "bert":
        cfg = tf.BertConfig(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=64, vocab_size=VOCAB, pad_token_id=0)
        return tf.BertForMaskedLM(cfg)
    raise ValueError(family)


def build_tiny(family: str, seed: int = 0) -> tuple[nn.Module, object]:
    """A seeded random tiny model of `family` and its tokenizer (not saved)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _model(family)
    return model.eval(), _tokenizer(family)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    dirs = {}
    for family in FAMILIES:
        model, tok = build_tiny(family)
        path = root / family
        model.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
        dirs[family] = path
    return dirs


@pytest.fixture
def load_tiny(tiny_model_dirs: dict[str, Path]) -> Callable[[str], ModelHandle]:
    from workbench.models import load

    def _load(family: str) -> ModelHandle:
        return load(str(tiny_model_dirs[family]), device="cpu", progress=False)

    return _load


@pytest.fixture(params=FAMILIES)
def tiny_lm(request: pytest.FixtureRequest, load_tiny: Callable[[str], ModelHandle]) -> ModelHandle:
    return load_tiny(request.param)


class SmallCNN(nn.Module):
    """conv-relu-pool twice, then a linear head: 3x16x16 images -> 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


@pytest.fixture
def small_cnn() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SmallCNN()
    return model.eval()


@pytest.fixture
def cnn_handle(small_cnn: nn.Module) -> ModelHandle:
    pre = ImagePreprocess(height=16, width=16, class_names=tuple(f"c{i}" for i in range(5)))
    return ModelHandle(spec="test:small-cnn", model=small_cnn, kind="image_classifier",
                       arch=Architecture(family="cnn", n_layers=2), preprocess=pre)


class GrayCNN(nn.Module):
    """Normalize inside, then conv-relu-pool and a linear head: 1x20x28 images in [-1, 1] -> 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.1]).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor([0.6]).view(1, 1, 1, 1))
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 12, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture
def gray_cnn_handle() -> ModelHandle:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = GrayCNN().eval()
    pre = ImagePreprocess(height=20, width=28, channels=1, input_range=(-1.0, 1.0), mean=(0.1,), std=(0.6,),
                          class_names=("w", "x", "y", "z"))
    return ModelHandle(spec="test:gray-cnn", model=model, kind="image_classifier",
                       arch=Architecture(family="cnn", n_layers=2), preprocess=pre)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every case study in quick mode, run once per session and shared (the studies cost minutes)."""
    out = tmp_path_factory.mktemp("reproduce") / "run"
    proc = reproduce(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"out": out, "summary": json.loads(proc.stdout)}
