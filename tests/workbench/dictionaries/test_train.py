"""Training dictionaries on a tiny GPT-2 from a text stream: it learns, the same seed gives the same
dictionary, an interrupted run resumes to the uninterrupted result, and the cache is keyed by the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import build_tiny
from workbench.dictionaries.train import Progress, TrainConfig, train_dictionary
from workbench.errors import WorkbenchError
from workbench.models import wrap_hf_model

CORPUS = [f"the {a} of {b} is {c}" for a in ("cat", "dog", "sun", "sea") for b in ("red", "blue", "old", "new")
          for c in ("here", "there", "big")]
SITE = "blocks.0.hook_resid_post"
SMALL = TrainConfig(kind="topk", width=64, k=4, n_activations=6144, batch_size=256, buffer=1024,
                    checkpoint_seconds=0.0)


@pytest.fixture
def tiny_gpt2() -> Any:
    model, tok = build_tiny("gpt2")
    return wrap_hf_model(model, tok, spec="tiny-gpt2", kind="causal_lm")


def _train(handle: Any, config: TrainConfig = SMALL, **kw: Any) -> Any:
    return train_dictionary(handle, SITE, config, corpus=CORPUS, progress=False, eval_activations=2048, **kw)


@pytest.mark.parametrize("kind", ["topk", "relu", "jumprelu"])
def test_each_kind_learns_the_site(tiny_gpt2: Any, kind: str) -> None:
    from workbench.dictionaries.activations import text_source
    from workbench.dictionaries.quality import dictionary_quality
    from workbench.dictionaries.sae import SparseDictionary

    config = TrainConfig(kind=kind, width=64, k=4 if kind == "topk" else None, n_activations=8192, batch_size=256,
                         buffer=1024)
    r = _train(tiny_gpt2, config, cache=False)
    q = r.quality
    untrained = SparseDictionary(r.dictionary.config, seed=config.seed)
    before = dictionary_quality(tiny_gpt2, untrained, source=text_source(tiny_gpt2, CORPUS, seed=1), n_activations=2048,
                                downstream=False, progress=False)
    assert q["explained_variance"] > 0.5 and before.explained_variance < 0.1, (q, before)
    assert (q["l0"] <= 4 + 1e-6) if kind == "topk" else (0 < q["l0"] < 64)
    assert q["downstream"]["metric"] == "cross_entropy"
    assert abs(q["downstream"]["spliced"] - q["downstream"]["clean"]) < abs(q["downstream"]["ablated"]
                                                                            - q["downstream"]["clean"])
    assert r.dictionary.site == SITE and r.dictionary.config.metadata["cache_key"] == r.key


def test_same_seed_same_dictionary_and_another_seed_differs(tiny_gpt2: Any) -> None:
    a = _train(tiny_gpt2, cache=False, evaluate=False).dictionary
    b = _train(tiny_gpt2, cache=False, evaluate=False).dictionary
    from dataclasses import replace

    c = _train(tiny_gpt2, replace(SMALL, seed=1), cache=False, evaluate=False).dictionary
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.W_dec, c.W_dec)


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tiny_gpt2: Any, tmp_path: Path) -> None:
    whole = _train(tiny_gpt2, cache=tmp_path / "a", evaluate=False)
    steps: list[int] = []

    def stop_midway(p: Progress) -> None:
        steps.append(p.step)
        if p.step == 14:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tiny_gpt2, cache=tmp_path / "b", evaluate=False, callback=stop_midway)
    assert list((tmp_path / "b" / "dictionaries").glob("*.checkpoint.safetensors"))
    resumed = _train(tiny_gpt2, cache=tmp_path / "b", evaluate=False)
    assert 0 < resumed.resumed_from_step <= 14 and not resumed.cached
    for k, v in whole.dictionary.state_dict().items():
        assert torch.equal(resumed.dictionary.state_dict()[k], v), k
    assert not list((tmp_path / "b" / "dictionaries").glob("*.checkpoint.safetensors"))  # done: checkpoint gone


def test_the_cache_is_keyed_by_model_and_config(tiny_gpt2: Any, tmp_path: Path) -> None:
    first = _train(tiny_gpt2, cache=tmp_path, evaluate=False)
    calls: list[int] = []
    again = _train(tiny_gpt2, cache=tmp_path, evaluate=False, callback=lambda p: calls.append(p.step))
    assert again.cached and not calls and again.key == first.key
    assert torch.equal(again.dictionary.W_dec, first.dictionary.W_dec)
    with torch.no_grad():
        tiny_gpt2.model.transformer.h[0].mlp.c_fc.weight.add_(0.01)  # another model: another key, trained afresh
    other = _train(tiny_gpt2, cache=tmp_path, evaluate=False)
    assert other.key != first.key and not other.cached


@pytest.mark.parametrize("changes, message", [
    ({"width": 0}, "width=0"),
    ({"k": 65}, "exceeds width=64"),
    ({"kind": "relu", "k": 4}, "TopK setting"),
    ({"buffer": 300}, "at least two batches"),
    ({"lr": float("nan")}, "lr"),
])
def test_bad_configs_are_refused(changes: dict, message: str) -> None:
    from dataclasses import asdict

    with pytest.raises(WorkbenchError, match=message):
        TrainConfig(**{**asdict(SMALL), **changes})


def test_an_unknown_site_is_refused_before_training(tiny_gpt2: Any) -> None:
    with pytest.raises(WorkbenchError, match="blocks.9"):
        train_dictionary(tiny_gpt2, "blocks.9.hook_resid_post", SMALL, corpus=CORPUS, cache=False, progress=False)
