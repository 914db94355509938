"""FactGPT: tokenizer guarantees, seeded training, and the trained zoo model (slow)."""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from workbench import zoo
from workbench.errors import WorkbenchError
from workbench.storage import sha256_file
from workbench.worlds.factworld import FactWorld, FactWorldConfig
from workbench.zoo import factgpt

TINY = factgpt.FactGPTConfig(
    world=FactWorldConfig(n_subjects=24, n_relations=2, objects_per_relation=4),
    vocab_size=400, n_layers=1, d_model=32, n_heads=2, batch_size=16, max_steps=6, check_every=3,
)


@pytest.mark.parametrize("vocab_size", [300, 1024])
def test_objects_are_single_tokens_and_subjects_are_not(vocab_size: int) -> None:
    world = FactWorld.generate(FactWorldConfig(seed=5))
    tok = factgpt.build_tokenizer(world, vocab_size=vocab_size)
    ids = factgpt.object_token_ids(tok, world)
    assert len(set(ids.values())) == len(world.objects)
    for subject in world.subjects:
        assert len(tok(" " + subject, add_special_tokens=False)["input_ids"]) >= 2
        assert len(tok(subject, add_special_tokens=False)["input_ids"]) >= 2
    text = "The capital of Vel Oran is Quenn."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_tiny_training_is_seeded_and_leaves_global_state_alone(tmp_path: Path) -> None:
    rng_before = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    infos = [factgpt.train(tmp_path / name, seed=seed, device="cpu", progress=False, config=TINY)
             for name, seed in (("a", 1), ("b", 1), ("c", 2))]
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads
    digests = [sha256_file(tmp_path / name / "model.safetensors") for name in "abc"]
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]
    assert infos[0]["steps"] == TINY.max_steps
    assert {"name", "accuracy", "n_facts", "n_subjects", "n_relations", "n_params", "n_layers", "d_model",
            "vocab_size", "train_seconds"} <= set(infos[0])
    assert infos[0]["n_facts"] == 48 and infos[0]["n_layers"] == 1
    assert FactWorld.load(tmp_path / "a" / factgpt.WORLD_FILE) == FactWorld.generate(replace(TINY.world, seed=1))


def test_progress_bar_goes_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("workbench.progress.is_terminal", lambda stream: True)  # a live bar, as on a terminal
    factgpt.train(tmp_path / "m", seed=0, device="cpu", progress=True, config=replace(TINY, max_steps=2))
    captured = capsys.readouterr()
    assert "training factgpt" in captured.err
    assert "training factgpt" not in captured.out


def test_load_rejects_a_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(WorkbenchError, match="model.safetensors"):
        factgpt.load(tmp_path)


# ---- the real zoo model (trained once into the normal cache, reused by other tests) ----


@pytest.fixture(scope="module")
def trained() -> Path:
    return zoo.ensure_trained("factgpt", progress=False)


@pytest.fixture(scope="module")
def handle(trained: Path):
    return factgpt.load(trained, device="cpu")


@pytest.mark.slow
def test_trained_model_knows_every_fact_through_every_template(trained: Path, handle) -> None:
    world = handle.info["world"]
    assert world == FactWorld.generate(FactWorldConfig(seed=factgpt.DEFAULT_SEED))
    assert factgpt.fact_accuracy(handle, world) >= 0.99
    info = zoo.info("factgpt", progress=False)
    assert info["accuracy"] >= 0.99
    assert info["n_subjects"] >= 300 and info["n_relations"] >= 4
    assert info["n_facts"] == len(world.facts)
    assert handle.kind == "causal_lm" and handle.arch.family == "gpt2"
    assert handle.arch.n_layers == info["n_layers"]


@pytest.mark.slow
def test_trained_model_is_robust_to_a_filler_prefix(handle) -> None:
    assert factgpt.fact_accuracy(handle, handle.info["world"], prefixed=True, seed=123) >= 0.9


@pytest.mark.slow
def test_plain_transformers_loads_the_folder_with_identical_logits(trained: Path, handle) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    tok = AutoTokenizer.from_pretrained(trained)
    prompts = [p.text for p in handle.info["world"].prompts()[:8]]
    for text in prompts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        assert ids.tolist() == handle.tokenizer(text, return_tensors="pt")["input_ids"].tolist()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, handle.model(ids).logits)


@pytest.mark.slow
def test_load_never_unpickles(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not [f for f in trained.rglob("*") if f.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]

    def refuse(*args, **kwargs):
        raise AssertionError("loading FactGPT tried to unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    h = factgpt.load(trained, device="cpu")
    assert h.info["world"].facts
