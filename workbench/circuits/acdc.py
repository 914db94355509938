"""ACDC (Conmy et al. 2023): the slow reference that attribution methods approximate.

Start from the whole graph; visit receivers from the logits backwards and, at each, its
incoming edges from the latest sender to the earliest (nodes: from the last layer back).
Remove a component for good when removing it (patching it to its corrupted value, on top of
everything removed so far) lowers the faithfulness by less than `threshold`; keep it
otherwise. One forward pass per component. Conmy et al. measure the change by the KL
divergence to the clean output; here it is the task's normalized metric, so the threshold
reads as a share of the behaviour, and the kept circuit keeps at least 1 - (removed x
threshold) of it. A component's score is the faithfulness it cost when it was tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.circuits.components import Level
from workbench.circuits.patching import CircuitRunner
from workbench.errors import WorkbenchError, check_finite
from workbench.progress import progress_bar


@dataclass(frozen=True)
class ACDCResult:
    scores: torch.Tensor  # float64, per component: faithfulness lost when it was removed
    keep: torch.Tensor  # bool, per component
    faithfulness: float  # of the kept circuit
    forward_passes: int


def visiting_order(runner: CircuitRunner, level: Level) -> list[int]:
    """Component indices in ACDC's order: receivers from the logits back, latest senders first."""
    graph = runner.graph
    if level == "node":
        return list(range(len(graph.nodes)))[::-1]
    index = {e: i for i, e in enumerate(graph.edges)}
    order = []
    for receiver in reversed(graph.receivers):
        senders = graph.receiver_senders()[receiver]
        order += [index[(graph.senders[u], receiver)] for u in reversed(senders)]
    return order


def acdc(runner: CircuitRunner, level: Level, *, threshold: float = 0.01, progress: bool = False) -> ACDCResult:
    """Greedy pruning by measured patching effect (see the module docstring)."""
    check_finite("ACDC threshold", threshold)
    if threshold < 0:
        raise WorkbenchError(f"ACDC threshold {threshold}: give a share of the behaviour >= 0, e.g. 0.01")
    n = len(runner.graph.components(level))
    keep = torch.ones(n, dtype=torch.bool)
    scores = torch.zeros(n, dtype=torch.float64)
    current = 1.0
    runner.corrupted_nodes()  # the cached corrupted run is not one of ACDC's trials
    passes = runner.forward_passes
    bar = progress_bar(visiting_order(runner, level), desc="ACDC", unit=level, enabled=progress)
    for i in bar:
        keep[i] = False
        trial = runner.faithfulness(runner.run(keep, level))
        cost = current - trial
        scores[i] = cost
        if cost < threshold:
            current = trial
        else:
            keep[i] = True
        bar.set_postfix(kept=int(keep.sum()), faithfulness=round(current, 3), refresh=False)
    bar.close()
    return ACDCResult(scores, keep, current, runner.forward_passes - passes)
