"""Steering as a bias edit: adds exactly strength x direction at the site; refusals explain; dose-response."""

from __future__ import annotations

import pytest
import torch

from editors.folding import NotFoldableError
from editors.steering import ContrastPairs, Steering, bias_target, dose_response, steering_direction, steering_hook
from workbench.bootstrap import spearman
from workbench.errors import WorkbenchError
from workbench.fingerprint import model_fingerprint
from workbench.hooks import capture

PAIRS = ContrastPairs.of(["the cat is red", "a red fox jumps over the dog"], ["the cat is blue", "a blue fox jumps over the dog"])
TEXTS = ["the quick brown fox", "one two three four five"]


def _enc(h):
    return {k: v for k, v in h.tokenizer(TEXTS, return_tensors="pt", padding=True).items()
            if k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.mark.parametrize("family,site", [("gpt2", "blocks.1.mlp.hook_out"), ("gpt_neox", "blocks.0.attn.hook_out"),
                                         ("bert", "blocks.1.mlp.hook_out"), ("gpt2", "blocks.0.hook_resid_post"),
                                         ("gpt_neox", "blocks.1.hook_resid_post")])
def test_bias_adds_the_vector_at_every_position(load_tiny, family: str, site: str) -> None:
    h = load_tiny(family)
    before = model_fingerprint(h.model)
    direction = steering_direction(h, site, PAIRS)
    delta = Steering(site, strength=3.0).fit(h, PAIRS)
    assert model_fingerprint(h.model) == before
    enc = _enc(h)
    with torch.no_grad(), capture(h, [site]) as acts:
        h.model(**enc)
    base = acts[site].clone()
    with delta.applied(h.model), torch.no_grad(), capture(h, [site]) as acts:
        h.model(**enc)
    assert torch.allclose(acts[site] - base, (3.0 * direction).expand_as(base), atol=1e-4)
    assert model_fingerprint(h.model) == before
    with steering_hook(h, site, 3.0 * direction), torch.no_grad():  # the run-time twin gives the same logits
        want = h.model(**enc)
    with delta.applied(h.model), torch.no_grad():
        got = h.model(**enc)
    key = "logits"
    assert torch.allclose(getattr(got, key), getattr(want, key), atol=1e-4)


def test_refusals(load_tiny) -> None:
    llama = load_tiny("llama")
    with pytest.raises(NotFoldableError, match="no bias"):
        Steering("blocks.0.mlp.hook_out").fit(llama, PAIRS)
    bert = load_tiny("bert")
    with pytest.raises(NotFoldableError, match="post-LN"):
        bias_target(bert, "blocks.0.hook_resid_post")
    gpt2 = load_tiny("gpt2")
    with pytest.raises(WorkbenchError, match="at least one"):
        Steering("blocks.0.mlp.hook_out").fit(gpt2, ContrastPairs.of([], ["the cat"]))


def test_dose_response_is_monotonic_for_a_linear_readout(load_tiny) -> None:
    h = load_tiny("gpt2")
    site = "blocks.1.hook_resid_post"
    d = steering_direction(h, site, PAIRS)
    enc = _enc(h)

    def measure(hh) -> float:  # projection of the residual stream on the direction
        with torch.no_grad(), capture(hh, [site]) as acts:
            hh.model(**enc)
        return float((acts[site] @ d).mean())

    r = dose_response(h, site, d, [2, -1, 0, 1, -2], measure)
    assert r.strengths == [-2, -1, 0, 1, 2] and r.monotonic and r.spearman == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
