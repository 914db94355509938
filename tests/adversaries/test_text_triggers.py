"""Text triggers: search, held-out universality, random-token control, re-tokenization, errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from adversaries.text_triggers import TextTrigger, target_token
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle

PROMPTS = ["the capital of vel oran is", "the city of tal mira is", "the river in rome is", "the language spoken in berlin is"]


def test_trigger_generate_on_tiny_gpt2(load_tiny: Callable[[str], ModelHandle]) -> None:
    h = load_tiny("gpt2")
    cfg = TextTrigger(n_tokens=2, steps=5, top_k=16, batch=32, n_controls=3, holdout=0.5)
    ae = cfg.generate(h, PROMPTS, "paris")
    e = ae.extra
    tid = target_token(h, "paris")
    assert e["target_token_id"] == tid and tid not in e["trigger_tokens"]
    assert e["n_fit"] == 2 and e["n_heldout"] == 2
    assert len(ae.adversarial) == len(PROMPTS) and ae.patch == e["trigger"]
    assert torch.equal(ae.success, ae.adversarial_pred == tid)
    assert 0 <= e["control_success"] <= 1 and len(e["control_success_draws"]) == 3
    assert e["target_prob_after"] > e["target_prob_before"]
    again = cfg.generate(h, PROMPTS, "paris")
    assert again.extra["trigger_tokens"] == e["trigger_tokens"]


def test_trigger_errors(load_tiny: Callable[[str], ModelHandle]) -> None:
    h = load_tiny("gpt2")
    with pytest.raises(WorkbenchError, match="causal LM"):
        TextTrigger(steps=1).generate(load_tiny("bert"), PROMPTS, "paris")
    with pytest.raises(WorkbenchError, match="non-empty"):
        TextTrigger(steps=1).generate(h, [], "paris")
    with pytest.raises(WorkbenchError, match="target"):
        TextTrigger(steps=1).generate(h, PROMPTS, "")
    with pytest.raises(WorkbenchError, match="out of range"):
        TextTrigger(steps=1).generate(h, PROMPTS, 10_000)
    with pytest.raises(WorkbenchError, match="holdout"):
        TextTrigger(holdout=1.0)


@pytest.mark.slow
def test_factgpt_universal_trigger_beats_random_tokens() -> None:
    import workbench

    h = workbench.load("zoo:factgpt", device="cpu", progress=False)
    world = h.info["world"]
    rel = world.relations[0]
    facts = [f for f in world.facts if f.relation_id == rel.relation_id][:16]
    target = next(o for o in rel.objects if all(f.object != o for f in facts[:4])) if len(rel.objects) > 1 else rel.objects[0]
    prompts = [rel.templates[0].format(f.subject) for f in facts if f.object != target]
    ae = TextTrigger(n_tokens=3, steps=15, holdout=0.5, n_controls=5).generate(h, prompts, target)
    e = ae.extra
    assert e["success_heldout"] > e["control_success"] + 0.3
    assert e["baseline_success"] == 0.0
