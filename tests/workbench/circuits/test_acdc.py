"""ACDC: every removal costs less than the threshold, so the kept circuit keeps at least
1 - removed x threshold of the behaviour; a huge threshold removes everything, zero keeps what matters."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.workbench.circuits.conftest import PAIRS
from workbench.circuits import CircuitRunner, acdc, component_graph
from workbench.circuits.acdc import visiting_order
from workbench.circuits.tasks import pairs_task
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle


@pytest.fixture
def runner(load_tiny: Callable[[str], ModelHandle]) -> CircuitRunner:
    h = load_tiny("gpt2")
    return CircuitRunner(h, component_graph(h), pairs_task(h, PAIRS, name="pairs"))


@pytest.mark.parametrize("level", ["edge", "node"])
@pytest.mark.parametrize("threshold", [0.005, 0.05])
def test_kept_circuit_keeps_its_share_and_its_reported_faithfulness(runner: CircuitRunner, level: str,
                                                                   threshold: float) -> None:
    result = acdc(runner, level, threshold=threshold)
    removed = int((~result.keep).sum())
    assert result.faithfulness >= 1 - removed * threshold
    assert runner.faithfulness(runner.run(result.keep, level)) == pytest.approx(result.faithfulness, abs=1e-6)
    assert bool((result.scores[result.keep] >= threshold).all())  # kept: each cost at least the threshold
    assert bool((result.scores[~result.keep] < threshold).all())
    assert result.forward_passes == len(result.keep)


def test_threshold_extremes(runner: CircuitRunner) -> None:
    assert not acdc(runner, "edge", threshold=10.0).keep.any()
    strict = acdc(runner, "edge", threshold=0.0)
    assert strict.faithfulness >= 1.0 - 1e-9  # never gives up any behaviour
    assert strict.keep.sum() < len(strict.keep)  # yet drops the edges that carry none
    with pytest.raises(WorkbenchError, match="threshold"):
        acdc(runner, "edge", threshold=-0.1)


def test_acdc_circuit_scores_on_its_own_ranking(runner: CircuitRunner) -> None:
    from workbench.circuits import DiscoveryConfig, find_circuit

    c = find_circuit(runner.handle, runner.task, DiscoveryConfig(method="acdc", level="edge", random_draws=1))
    assert c.ranking == "signed" and c.results["cpr_curve"] == c.results["curve"]
    kept = sum(c.kept)
    top = sorted(range(len(c.scores)), key=lambda i: -c.scores[i])[:kept]
    assert all(c.kept[i] for i in top)  # the kept edges are the top of its ranking


def test_visits_receivers_from_the_logits_back(runner: CircuitRunner) -> None:
    edges = runner.graph.components("edge")
    order = [edges[i] for i in visiting_order(runner, "edge")]
    assert sorted(order) == sorted(edges)
    assert order[0] == "m1->logits" and order[-1] == "input->a0"
    assert torch.equal(torch.tensor(visiting_order(runner, "node")), torch.arange(len(runner.graph.nodes)).flip(0))


def test_learned_mask_settings_and_loss(runner: CircuitRunner) -> None:
    from workbench.circuits.mask import MaskConfig, learn_mask

    with pytest.raises(WorkbenchError, match="mask settings"):
        MaskConfig(steps=0)
    with pytest.raises(WorkbenchError, match="finite"):
        MaskConfig(sparsity=float("nan"))
    result = learn_mask(runner, "edge", MaskConfig(steps=30, sparsity=0.3))
    assert result.losses[-1] < result.losses[0]
    assert bool((result.keep == (result.scores > 0)).all()) and 0 < int(result.keep.sum()) < len(result.keep)
    assert runner.faithfulness(runner.run(result.keep, "edge")) == pytest.approx(result.faithfulness)
    assert all(p.requires_grad for p in runner.model.parameters())  # gates trained, weights untouched and restored
