"""One call from a model and a task to a scored circuit: find, select, score against random, time.

    h = workbench.load("zoo:factgpt")
    task = task_for(h, "facts")
    circuit = find_circuit(h, task, method="eap-ig", level="edge")
    circuit.results["cpr"], circuit.results["random_cpr"], circuit.edges[:5]

Attribution methods rank every component; their circuit is the smallest top-k that keeps
`target` of the behaviour (bisection over k). ACDC prunes, and a learned mask gates, to their
own circuits. All are scored on faithfulness curves over MIB's sizes and against the same random
circuits (seeded).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from workbench.circuits.acdc import acdc
from workbench.circuits.attribution import attribution_scores
from workbench.circuits.components import ComponentGraph, Level, component_graph
from workbench.circuits.graph import Circuit
from workbench.circuits.mask import MaskConfig, learn_mask
from workbench.circuits.patching import CircuitRunner
from workbench.circuits.scoring import (
    FRACTIONS,
    faithfulness_curve,
    keep_top,
    order_of,
    random_curve,
    smallest_faithful,
)
from workbench.circuits.tasks import CircuitTask
from workbench.errors import WorkbenchError, check_finite
from workbench.fingerprint import model_fingerprint
from workbench.handle import ModelHandle

Method = Literal["eap", "eap-ig", "acdc", "mask"]
METHODS: tuple[str, ...] = ("eap", "eap-ig", "acdc", "mask")


@dataclass(frozen=True)
class DiscoveryConfig:
    """How to find and score a circuit (defaults: MIB's sizes, 5 random draws, 90% target)."""

    method: str = "eap-ig"
    level: str = "edge"
    steps: int = 5  # EAP-IG interpolation steps (MIB uses 5)
    threshold: float = 0.01  # ACDC: share of the behaviour an edge must carry to stay
    target: float = 0.9  # attribution methods: the circuit is the smallest top-k with this faithfulness
    mask_steps: int = 100  # learned mask: optimization steps
    sparsity: float = 0.3  # learned mask: weight of the mean gate against (1 - faithfulness)^2
    mask_lr: float = 0.1
    random_draws: int = 5
    fractions: tuple[float, ...] = FRACTIONS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise WorkbenchError(f"unknown circuit method {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.level not in ("node", "edge"):
            raise WorkbenchError(f"unknown circuit level {self.level!r}; expected node or edge")
        for name in ("threshold", "target", "sparsity", "mask_lr"):
            check_finite(f"DiscoveryConfig {name}", getattr(self, name))
        if self.steps < 1 or self.random_draws < 1 or self.mask_steps < 1:
            raise WorkbenchError(f"steps={self.steps}, random_draws={self.random_draws}, mask_steps={self.mask_steps}: "
                                 "give at least 1 of each")


def find_circuit(handle: ModelHandle, task: CircuitTask, config: DiscoveryConfig | None = None, *,
                 graph: ComponentGraph | None = None, progress: bool = False) -> Circuit:
    """Find a circuit with `config.method`, then score it (CPR, CMD, random CPR/CMD, runtime)."""
    config = DiscoveryConfig() if config is None else config
    level: Level = config.level  # type: ignore[assignment]
    graph = component_graph(handle) if graph is None else graph
    components = graph.components(level)
    was_training = handle.model.training
    handle.model.eval()
    try:
        runner = CircuitRunner(handle, graph, task)
        start = time.perf_counter()
        if config.method == "acdc":
            result = acdc(runner, level, threshold=config.threshold, progress=progress)
            scores, keep, ranking = result.scores, result.keep, "signed"
            faithfulness = result.faithfulness
            search_seconds = time.perf_counter() - start
        elif config.method == "mask":
            mask = learn_mask(runner, level, MaskConfig(steps=config.mask_steps, lr=config.mask_lr,
                                                        sparsity=config.sparsity, seed=config.seed), progress=progress)
            scores, keep, ranking = mask.scores, mask.keep, "signed"
            faithfulness = mask.faithfulness
            search_seconds = time.perf_counter() - start
        else:
            steps = 1 if config.method == "eap" else config.steps
            scores = attribution_scores(runner, level, steps=steps, progress=progress)
            ranking = "abs"
            search_seconds = time.perf_counter() - start
            k, faithfulness = smallest_faithful(runner, level, order_of(scores, ranking), target=config.target)
            keep = keep_top(order_of(scores, ranking), k, len(components))
        seconds = time.perf_counter() - start
        order = order_of(scores, ranking)  # type: ignore[arg-type]
        curve = faithfulness_curve(runner, level, order, fractions=config.fractions, progress=progress)
        # MIB scores CPR on the circuits of the components that raise the metric most (signed scores)
        # and CMD on those that move it most either way (|score|); ACDC and masks give one ranking.
        cpr_curve = curve if ranking == "signed" else faithfulness_curve(
            runner, level, order_of(scores, "signed"), fractions=config.fractions, progress=progress)
        rand = random_curve(runner, level, draws=config.random_draws, seed=config.seed, fractions=config.fractions,
                            progress=progress)
    finally:
        handle.model.train(was_training)
    results = {
        "cpr": round(cpr_curve.cpr, 6), "cmd": round(curve.cmd, 6),
        "random_cpr": round(rand.cpr, 6), "random_cmd": round(rand.cmd, 6),
        "faithfulness": round(faithfulness, 6),
        "clean_metric": round(runner.clean_metric, 6), "corrupted_metric": round(runner.corrupted_metric, 6),
        "seconds": round(seconds, 4), "search_seconds": round(search_seconds, 4),
        "curve": curve.to_json(), "cpr_curve": cpr_curve.to_json(), "random_curve": rand.to_json(),
        "settings": {"steps": config.steps if config.method == "eap-ig" else (1 if config.method == "eap" else None),
                     "threshold": config.threshold if config.method == "acdc" else None,
                     "target": config.target if config.method in ("eap", "eap-ig") else None,
                     "mask": {"steps": config.mask_steps, "sparsity": config.sparsity, "lr": config.mask_lr}
                     if config.method == "mask" else None,
                     "random_draws": config.random_draws, "seed": config.seed},
        "task": task.info, "graph": {"kind": graph.kind, "nodes": len(graph.nodes), "edges": len(graph.edges)},
    }
    return Circuit(
        model=handle.spec, fingerprint=model_fingerprint(handle.model), task=task.name, method=config.method,
        level=level, components=tuple(components), scores=tuple(float(s) for s in scores),
        kept=tuple(bool(k) for k in torch.as_tensor(keep).tolist()), ranking=ranking, results=results,
    )
