"""Text features: top contexts match direct captures; token search improves its objective deterministically."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.hooks import capture
from workbench.text_features import (
    DirectionObjective,
    LogitObjective,
    NeuronObjective,
    allowed_tokens,
    token_search,
    top_contexts,
)

TEXTS = ["the capital of paris is rome", "the quick brown fox jumps over the lazy dog",
         "red blue green cat dog", "one two three four five six seven eight nine ten", "vel oran is a city in the north"]


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_top_contexts_values_are_the_captured_activations(load_tiny: Callable[[str], ModelHandle], family: str) -> None:
    h = load_tiny(family)
    site = "blocks.1.mlp.hook_post"
    tc = top_contexts(h, site, 3, TEXTS, k=4)
    acts = [r["activation"] for r in tc.rows]
    assert acts == sorted(acts, reverse=True) and len(acts) == 4
    best = tc.rows[0]
    ids = h.tokenizer(TEXTS[best["text_index"]], return_tensors="pt")
    with torch.no_grad(), capture(h, [site]) as got:
        h.model(**ids)
    assert float(got[site][0, best["position"], 3]) == pytest.approx(best["activation"], abs=1e-4)
    assert "[[" in best["context"]


def test_top_contexts_direction_and_errors(load_tiny: Callable[[str], ModelHandle]) -> None:
    h = load_tiny("gpt2")
    site = "blocks.0.hook_resid_post"
    d = torch.zeros(32)
    d[5] = 1.0
    by_dir = top_contexts(h, site, d, TEXTS, k=3)
    by_unit = top_contexts(h, site, 5, TEXTS, k=3)
    assert [r["activation"] for r in by_dir.rows] == pytest.approx([r["activation"] for r in by_unit.rows], abs=1e-5)
    with pytest.raises(WorkbenchError, match="out of range"):
        top_contexts(h, site, 32, TEXTS)
    with pytest.raises(WorkbenchError, match="entries"):
        top_contexts(h, site, torch.ones(7), TEXTS)
    with pytest.raises(WorkbenchError, match="unknown site"):
        top_contexts(h, "blocks.9.mlp.hook_post", 0, TEXTS)


def test_token_search_improves_and_is_deterministic(load_tiny: Callable[[str], ModelHandle]) -> None:
    h = load_tiny("gpt2")
    tid = h.tokenizer.convert_tokens_to_ids("paris")
    obj = LogitObjective(target_ids=(tid,))
    allow = allowed_tokens(h, exclude=[tid])
    kw = dict(n_tokens=3, steps=6, contexts=[("", " the capital of vel oran is"), ("", " the city is")],
              top_k=16, batch=32, allowed=allow)
    a = token_search(h, obj, seed=0, **kw)
    b = token_search(h, obj, seed=0, **kw)
    assert a.tokens == b.tokens and a.trace == b.trace
    assert a.trace[-1] >= a.trace[0] and a.score == a.trace[-1]
    assert tid not in a.tokens and all(int(t) in set(allow.tolist()) for t in a.tokens)
    # the search beats random triggers of the same length
    from workbench.text_features import _context_ids, _evaluate

    ctx = _context_ids(h, kw["contexts"])
    g = torch.Generator().manual_seed(1)
    rnd = allow[torch.randint(len(allow), (32, 3), generator=g)]
    assert a.score > float(_evaluate(h, obj, ctx, rnd).mean(1).mean())


@pytest.mark.parametrize("family", ["bert", "gpt_neox"])
def test_token_search_neuron_objective(load_tiny: Callable[[str], ModelHandle], family: str) -> None:
    h = load_tiny(family)
    obj = NeuronObjective("blocks.0.mlp.hook_post", 4, position="trigger")
    res = token_search(h, obj, n_tokens=2, steps=4, seed=0, top_k=8, batch=16)
    assert res.score >= res.trace[0] and len(res.tokens) == 2 and res.n_evaluations > 1
    direction = torch.randn(64, generator=torch.Generator().manual_seed(0))
    res2 = token_search(h, DirectionObjective("blocks.0.mlp.hook_post", direction, position="mean"), n_tokens=2, steps=2,
                        seed=0, top_k=8, batch=8)
    assert res2.trace == sorted(res2.trace)


def test_token_search_errors(load_tiny: Callable[[str], ModelHandle], cnn_handle: ModelHandle) -> None:
    h = load_tiny("gpt2")
    obj = LogitObjective(target_ids=(10,))
    with pytest.raises(WorkbenchError, match="contexts"):
        token_search(h, obj, contexts=[])
    with pytest.raises(WorkbenchError, match="allowed"):
        token_search(h, obj, allowed=torch.tensor([10_000]))
    with pytest.raises(WorkbenchError, match="not a text model"):
        token_search(cnn_handle, obj)
    enc = load_tiny("bert")
    with pytest.raises(WorkbenchError, match="language-model head"):
        token_search(enc.__class__(**{**enc.__dict__, "model": enc.model.bert}), obj, steps=1)
