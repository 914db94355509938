"""Real-size architecture models: published sizes, seeded random weights, built on load, never trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench import zoo
from workbench.errors import UnknownModelError, WorkbenchError
from workbench.fingerprint import model_fingerprint
from workbench.models import load
from workbench.zoo import architectures

ROOT = Path(__file__).resolve().parents[3]

# Parameter counts of the published checkpoints (GPT-2's tied unembedding counted once).
PUBLISHED = {"gpt2-small-arch": 124_439_808, "gpt2-medium-arch": 354_823_168, "pythia-160m-arch": 162_322_944,
             "llama-arch": 1_100_048_384}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_sizes_match_the_published_checkpoints(name: str) -> None:
    info = zoo.describe(f"zoo:{name}")
    assert info["parameters"] == PUBLISHED[name]
    assert info["random_weights"] is True and "timing" in info["purpose"]
    assert info["architecture"] == {"gpt2-small-arch": "gpt2", "gpt2-medium-arch": "gpt2",
                                    "pythia-160m-arch": "gpt_neox", "llama-arch": "llama"}[name]


def test_same_seed_same_bits_and_the_world_rides_along() -> None:
    a = load("zoo:gpt2-small-arch", progress=False)
    b = load("zoo:gpt2-small-arch", progress=False)
    assert model_fingerprint(a.model) == model_fingerprint(b.model)
    assert sum(p.numel() for p in a.model.parameters()) == PUBLISHED["gpt2-small-arch"]
    assert a.info["random_weights"] is True and a.world is not None and a.arch.n_layers == 12
    assert a.spec == "zoo:gpt2-small-arch"
    prompt = a.world.prompts()[0]
    ids = a.tokenizer(prompt.text if hasattr(prompt, "text") else str(prompt), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = a.model(ids).logits
    assert logits.shape[-1] == 50257 and torch.isfinite(logits).all()
    del b
    other = architectures.build("gpt2-small-arch", seed=1)
    assert model_fingerprint(other) != model_fingerprint(a.model)


def test_never_trained_and_device_map_is_checked() -> None:
    with pytest.raises(WorkbenchError, match="built on load, never trained"):
        zoo.ensure_trained("gpt2-small-arch")
    with pytest.raises(WorkbenchError, match="trained zoo models fit on one device"):
        load("zoo:factgpt", device_map="auto", progress=False)
    with pytest.raises(WorkbenchError, match="device_map"):
        architectures.load("gpt2-small-arch", device_map="balanced")
    with pytest.raises(UnknownModelError, match="gpt2-small-arch"):
        zoo.describe("zoo:gpt2-large-arch")


def test_device_map_auto_without_accelerate_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if not installed
    with pytest.raises(WorkbenchError, match=r"interp-workbench\[big\]"):
        architectures.load("gpt2-small-arch", device_map="auto")


def test_cli_info_and_train() -> None:
    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "workbench_cli.main", *argv], cwd=ROOT, capture_output=True,
                              text=True)

    info = run("zoo", "info", "pythia-160m-arch", "--json")
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["parameters"] == PUBLISHED["pythia-160m-arch"] and data["architecture"] == "gpt_neox"
    train = run("zoo", "train", "gpt2-small-arch")
    assert train.returncode == 2 and len(train.stderr.strip().splitlines()) == 1
    listing = run("zoo", "list", "--json")
    rows = {r["spec"]: r for r in json.loads(listing.stdout)}
    assert rows["zoo:llama-arch"]["cached"] is None and "random weights" in rows["zoo:llama-arch"]["note"]
