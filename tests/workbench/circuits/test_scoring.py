"""MIB scores: the area arithmetic, the curve's endpoints, and that methods beat random circuits on the
zoo FactGPT and ShapesNet with the same numbers for the same seed."""

from __future__ import annotations

import pytest
import torch

from tests import zoo_models
from workbench.circuits import DiscoveryConfig, FaithfulnessCurve, area, find_circuit, task_for
from workbench.circuits.scoring import order_of, sizes_for
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle


def test_cpr_and_cmd_of_the_full_and_the_empty_circuit() -> None:
    full = FaithfulnessCurve((0, 5, 10), 10, (1.0, 1.0, 1.0))
    assert full.cpr == pytest.approx(1.0) and full.cmd == pytest.approx(0.0)
    empty = FaithfulnessCurve((0, 5, 10), 10, (0.0, 0.0, 0.0))
    assert empty.cpr == pytest.approx(0.0) and empty.cmd == pytest.approx(1.0)
    over = FaithfulnessCurve((0, 5, 10), 10, (0.0, 2.0, 1.0))  # CMD counts overshoot as well as shortfall
    assert over.cpr == pytest.approx(1.25) and over.cmd == pytest.approx(0.75)
    assert area([0.0, 1.0], [0.0, 1.0]) == pytest.approx(0.5)
    with pytest.raises(WorkbenchError):
        area([0.0], [1.0])


def test_sizes_cover_the_ends_and_round_small_shares_up_to_one() -> None:
    assert sizes_for(105) == [0, 1, 2, 5, 10, 21, 52, 105]  # 0.1%, 0.2% and 0.5% all become 1 edge
    assert sizes_for(10_000)[:4] == [0, 10, 20, 50]
    with pytest.raises(WorkbenchError):
        sizes_for(10, [1.5])


def test_order_is_by_size_of_score_and_deterministic_on_ties() -> None:
    scores = torch.tensor([0.1, -3.0, 2.0, 0.1], dtype=torch.float64)
    assert order_of(scores).tolist() == [1, 2, 0, 3]
    assert order_of(scores, "signed").tolist() == [2, 0, 3, 1]


@pytest.fixture(scope="module")
def factgpt() -> ModelHandle:
    return zoo_models.factgpt()


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_found_circuits_beat_random_ones_on_factgpt(factgpt: ModelHandle, method: str) -> None:
    task = task_for(factgpt, "facts", n=16, seed=0)
    circuit = find_circuit(factgpt, task, DiscoveryConfig(method=method, level="edge", steps=3, random_draws=3))
    r = circuit.results
    assert r["cpr"] > r["random_cpr"] + 0.2
    assert r["cmd"] < r["random_cmd"] - 0.2
    assert r["curve"]["faithfulness"][0] == pytest.approx(0.0, abs=1e-4)
    assert r["curve"]["faithfulness"][-1] == pytest.approx(1.0, abs=1e-4)
    assert r["faithfulness"] >= 0.9 and 0 < len(circuit.edges) < len(circuit.components)
    # MIB: CPR on the circuits ranked by signed score, CMD on those ranked by |score|
    assert r["cpr"] == r["cpr_curve"]["cpr"] and r["cmd"] == r["curve"]["cmd"]
    assert r["cpr_curve"]["faithfulness"] != r["curve"]["faithfulness"]


def test_same_seed_same_numbers(factgpt: ModelHandle) -> None:
    def run(seed: int) -> dict:
        task = task_for(factgpt, "facts", n=8, seed=seed)
        c = find_circuit(factgpt, task, DiscoveryConfig(method="eap", level="node", random_draws=2, seed=seed))
        return {"scores": c.scores, "kept": c.kept, **{k: c.results[k] for k in ("cpr", "cmd", "random_cpr", "random_cmd")}}

    first = run(0)
    assert run(0) == first
    assert run(1) != first


def test_trojan_circuit_beats_random_channels() -> None:
    from workbench.models import load

    h = load("zoo:shapesnet", device="cpu", progress=False)
    task = task_for(h, "trojan:patch-universal", n=16, seed=0)
    assert task.info["target"] == "cross"
    circuit = find_circuit(h, task, DiscoveryConfig(method="eap", level="node", random_draws=2))
    r = circuit.results
    assert r["clean_metric"] > r["corrupted_metric"]
    assert r["cpr"] > r["random_cpr"] + 0.1
    assert all(n.split(".c")[0] in ("stem", "layer1", "layer2", "layer3") for n in circuit.nodes)
