"""Attribution patching: exact on a linear model, first-order right on a transformer, EAP-IG with one
step is EAP, and a planted head is what it finds."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.conftest import build_tiny
from tests.workbench.circuits.conftest import PAIRS, PLANTED_HEAD, PLANTED_LAYER
from workbench.circuits import (
    CircuitRunner,
    CircuitTask,
    DiscoveryConfig,
    LogitDifference,
    attribution_scores,
    component_graph,
    find_circuit,
)
from workbench.circuits.tasks import pairs_task
from workbench.handle import ModelHandle
from workbench.models import wrap_hf_model


def test_node_scores_equal_patching_effects_on_a_linear_model(linear_cnn_task: Callable) -> None:
    handle, task = linear_cnn_task()
    runner = CircuitRunner(handle, component_graph(handle), task)
    scores = attribution_scores(runner, "node")
    n = len(runner.graph.nodes)
    assert n == 4 + 5
    for i in range(n):
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        effect = runner.clean_metric - runner.run(keep, "node")
        assert float(scores[i]) == pytest.approx(effect, rel=1e-4, abs=1e-5)
    # the gradient is constant on a linear model, so integrating it changes nothing
    assert torch.allclose(attribution_scores(runner, "node", steps=7), scores, rtol=1e-4, atol=1e-6)


def _near_task(eps: float) -> tuple[ModelHandle, CircuitTask]:
    """A tiny GPT-2 in float64 on random embeddings, the corrupted ones `eps` away."""
    model, tok = build_tiny("gpt2", seed=1)
    model = model.double()
    handle = wrap_hf_model(model, tok, spec="test:gpt2-f64", kind="causal_lm")
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 5, model.config.n_embd, generator=g, dtype=torch.float64)
    corrupted = clean + eps * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    metric = LogitDifference(torch.tensor([4, 4, 4]), torch.tensor([10, 11, 12]), torch.tensor([20, 21, 22]))
    return handle, CircuitTask("near", {"inputs_embeds": clean}, {"inputs_embeds": corrupted}, metric)


@pytest.mark.parametrize("level", ["edge", "node"])
def test_scores_match_patching_effects_to_first_order(level: str) -> None:
    handle, task = _near_task(1e-4)
    runner = CircuitRunner(handle, component_graph(handle), task)
    scores = attribution_scores(runner, level)
    n = len(scores)
    effects = []
    for i in range(n):
        keep = torch.ones(n, dtype=torch.bool)
        keep[i] = False
        effects.append(runner.clean_metric - runner.run(keep, level))
    effects_t = torch.tensor(effects, dtype=torch.float64)
    scale = float(effects_t.abs().max())
    assert scale > 0
    assert torch.allclose(scores, effects_t, atol=1e-3 * scale, rtol=0)  # second-order terms are ~eps smaller


def test_scores_do_not_match_patching_far_from_linear(load_tiny: Callable[[str], ModelHandle]) -> None:
    """The first-order test above can fail: on real token swaps the two differ visibly."""
    h = load_tiny("gpt2")
    runner = CircuitRunner(h, component_graph(h), pairs_task(h, PAIRS, name="pairs"))
    scores = attribution_scores(runner, "node")
    keep = torch.ones(len(scores), dtype=torch.bool)
    keep[0] = False
    assert abs(float(scores[0]) - (runner.clean_metric - runner.run(keep, "node"))) > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
@pytest.mark.parametrize("level", ["node", "edge"])
def test_eap_ig_with_one_step_is_eap_and_more_steps_differ(load_tiny: Callable[[str], ModelHandle], family: str,
                                                          level: str) -> None:
    h = load_tiny(family)
    runner = CircuitRunner(h, component_graph(h), pairs_task(h, PAIRS, name="pairs"))
    eap = attribution_scores(runner, level)
    assert torch.equal(attribution_scores(runner, level, steps=1), eap)
    ig = attribution_scores(runner, level, steps=4)
    assert not torch.allclose(ig, eap)


def _planted_task(handle: ModelHandle) -> CircuitTask:
    return pairs_task(handle, PAIRS, name="pairs")


def test_eap_finds_the_planted_head(planted_gpt2: ModelHandle) -> None:
    runner = CircuitRunner(planted_gpt2, component_graph(planted_gpt2), _planted_task(planted_gpt2))
    nodes = list(runner.graph.nodes)
    scores = dict(zip(nodes, attribution_scores(runner, "node").tolist()))
    planted = f"a{PLANTED_LAYER}.h{PLANTED_HEAD}"
    heads = {n: s for n, s in scores.items() if ".h" in n}
    assert max(heads, key=lambda n: abs(heads[n])) == planted
    assert all(s == 0.0 for n, s in heads.items() if n != planted)  # they write nothing
    edges = dict(zip(runner.graph.components("edge"), attribution_scores(runner, "edge").tolist()))
    from_heads = {e: s for e, s in edges.items() if ".h" in e.split("->")[0]}
    assert max(from_heads, key=lambda e: abs(from_heads[e])).startswith(planted + "->")
    assert all(s == 0.0 for e, s in from_heads.items() if not e.startswith(planted + "->"))


@pytest.mark.parametrize("method", ["eap", "eap-ig", "acdc", "mask"])
def test_every_method_keeps_the_planted_head_and_drops_silent_ones(planted_gpt2: ModelHandle, method: str) -> None:
    circuit = find_circuit(planted_gpt2, _planted_task(planted_gpt2),
                           DiscoveryConfig(method=method, level="node", random_draws=2))
    planted = f"a{PLANTED_LAYER}.h{PLANTED_HEAD}"
    assert planted in circuit.nodes
    assert not [n for n in circuit.nodes if ".h" in n and n != planted]
    floor = {"acdc": 1 - 0.01 * len(circuit.components), "mask": 0.5}.get(method, 0.9)
    assert circuit.results["faithfulness"] >= floor
