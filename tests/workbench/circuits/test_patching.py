"""Running a model with a circuit: the full circuit is the clean model, the empty one the corrupted
model, removing every edge out of a sender is patching that node, and no hook outlives a run."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.workbench.circuits.conftest import PAIRS
from workbench.circuits import CircuitRunner, component_graph
from workbench.circuits.tasks import logits_of, pairs_task
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle

LM_FAMILIES = ("gpt2", "gpt_neox", "llama")


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", LM_FAMILIES)
@pytest.mark.parametrize("level", ["node", "edge"])
def test_full_circuit_is_clean_and_empty_is_corrupted(load_tiny: Callable[[str], ModelHandle], family: str,
                                                       level: str) -> None:
    h = load_tiny(family)
    runner = CircuitRunner(h, component_graph(h), pairs_task(h, PAIRS, name="pairs"))
    n = len(runner.graph.components(level))
    full = runner.run(torch.ones(n, dtype=torch.bool), level)
    empty = runner.run(torch.zeros(n, dtype=torch.bool), level)
    assert full == pytest.approx(runner.clean_metric, abs=1e-5)
    assert empty == pytest.approx(runner.corrupted_metric, abs=1e-4)
    assert runner.faithfulness(full) == pytest.approx(1.0, abs=1e-5)
    assert runner.faithfulness(empty) == pytest.approx(0.0, abs=1e-4)
    assert _hooks(h.model) == 0


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_cutting_every_edge_out_of_a_sender_is_patching_that_node(load_tiny: Callable[[str], ModelHandle],
                                                                  family: str) -> None:
    h = load_tiny(family)
    runner = CircuitRunner(h, component_graph(h), pairs_task(h, PAIRS, name="pairs"))
    g = runner.graph
    for sender in ("input", "a0.h1", "m0", "a1.h3"):
        node_keep = torch.tensor([n != sender for n in g.nodes])
        edge_keep = torch.tensor([u != sender for u, _ in g.edges])
        assert runner.run(edge_keep, "edge") == pytest.approx(runner.run(node_keep, "node"), abs=1e-4)


def test_neox_parallel_mlp_reads_no_head_of_its_layer(load_tiny: Callable[[str], ModelHandle]) -> None:
    neox, gpt2 = component_graph(load_tiny("gpt_neox")), component_graph(load_tiny("gpt2"))
    assert neox.parallel and not gpt2.parallel
    assert ("a0.h0", "m0") not in neox.edges and ("a0.h0", "m0") in gpt2.edges
    assert len(gpt2.edges) == len(neox.edges) + 2 * 4  # one layer's heads into its own MLP, per layer
    assert gpt2.nodes[:3] == ("input", "a0.h0", "a0.h1") and gpt2.receivers[-1] == "logits"


def test_cnn_channels_patch_to_the_corrupted_run_and_hooks_are_removed(cnn_handle: ModelHandle) -> None:
    from workbench.circuits import CircuitTask, ClassLogit

    g = torch.Generator().manual_seed(0)
    task = CircuitTask("cnn", torch.rand(4, 3, 16, 16, generator=g), torch.rand(4, 3, 16, 16, generator=g), ClassLogit(2))
    graph = component_graph(cnn_handle)
    assert graph.kind == "cnn" and [s for s, _ in graph.cnn_sites] == ["features"]
    runner = CircuitRunner(cnn_handle, graph, task)
    n = len(graph.nodes)
    before = logits_of(cnn_handle.model(task.clean))
    assert runner.run(torch.ones(n, dtype=torch.bool), "node") == pytest.approx(runner.clean_metric, abs=1e-6)
    assert runner.run(torch.zeros(n, dtype=torch.bool), "node") == pytest.approx(runner.corrupted_metric, abs=1e-5)
    with pytest.raises(WorkbenchError, match="edge-level circuits need a transformer"):
        runner.run(torch.ones(n, dtype=torch.bool), "edge")
    assert _hooks(cnn_handle.model) == 0
    assert torch.equal(logits_of(cnn_handle.model(task.clean)), before)


def test_a_task_without_behaviour_is_refused(load_tiny: Callable[[str], ModelHandle]) -> None:
    h = load_tiny("gpt2")
    same = [{**p, "corrupted": p["clean"]} for p in PAIRS]
    with pytest.raises(WorkbenchError, match="no behaviour to explain"):
        CircuitRunner(h, component_graph(h), pairs_task(h, same, name="same"))


@pytest.mark.parametrize("family", LM_FAMILIES)
@pytest.mark.parametrize("level", ["node", "edge"])
def test_soft_masks_at_zero_and_one_are_the_hard_circuit(load_tiny: Callable[[str], ModelHandle], family: str,
                                                         level: str) -> None:
    h = load_tiny(family)
    runner = CircuitRunner(h, component_graph(h), pairs_task(h, PAIRS, name="pairs"))
    n = len(runner.graph.components(level))
    keep = torch.rand(n, generator=torch.Generator().manual_seed(2)) > 0.5
    with torch.no_grad():
        assert float(runner.run_soft(keep.float(), level)) == pytest.approx(runner.run(keep, level), abs=1e-5)
        half = float(runner.run_soft(torch.full((n,), 0.5), level))
    assert half != pytest.approx(runner.clean_metric, abs=1e-6) and half != pytest.approx(runner.corrupted_metric, abs=1e-6)
    gates = torch.full((n,), 0.7, requires_grad=True)
    with torch.enable_grad():
        runner.run_soft(gates, level).backward()
    assert gates.grad is not None and bool(gates.grad.abs().sum() > 0)
    assert _hooks(h.model) == 0
