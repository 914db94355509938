"""MIB-style scores of a circuit method: faithfulness over circuit sizes, CPR and CMD, beside random circuits.

Faithfulness of a circuit C is (m(C) - m(empty)) / (m(full) - m(empty)), with m the task's
metric, the full model giving 1 and the corrupted run (nothing kept) 0. A method's ranking
of the components gives one circuit per size (its top k); the curve is faithfulness against
the share of components kept, at MIB's sizes (0.1% .. 100%). CPR is the area under the
curve (higher: the top components carry the behaviour), CMD the area under |1 - f| (lower:
the circuit reproduces the model, neither more nor less). While a curve stays within [0, 1],
CMD = 1 - CPR; they part where it overshoots, which is why MIB ranks components by signed
score for CPR (those that raise the metric first) and by |score| for CMD. Random circuits of
the same sizes (seeded draws, averaged) give the floor to compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from workbench.circuits.components import Level
from workbench.circuits.patching import CircuitRunner
from workbench.errors import WorkbenchError
from workbench.progress import progress_bar

FRACTIONS: tuple[float, ...] = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
Ranking = Literal["abs", "signed"]


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness at each circuit size (`sizes` components kept of `total`)."""

    sizes: tuple[int, ...]
    total: int
    faithfulness: tuple[float, ...]

    @property
    def fractions(self) -> tuple[float, ...]:
        return tuple(k / self.total for k in self.sizes)

    @property
    def cpr(self) -> float:
        return area(self.fractions, self.faithfulness)

    @property
    def cmd(self) -> float:
        return area(self.fractions, [abs(1.0 - f) for f in self.faithfulness])

    def to_json(self) -> dict[str, object]:
        return {"sizes": list(self.sizes), "total": self.total, "fractions": [round(x, 6) for x in self.fractions],
                "faithfulness": [round(f, 6) for f in self.faithfulness], "cpr": round(self.cpr, 6),
                "cmd": round(self.cmd, 6)}


def area(x: Sequence[float], y: Sequence[float]) -> float:
    """Trapezoidal area under y(x) over x in [0, 1] (x sorted, from 0 to 1)."""
    if len(x) != len(y) or len(x) < 2:
        raise WorkbenchError("an area needs at least two (size, faithfulness) points")
    total = 0.0
    for i in range(1, len(x)):
        total += (x[i] - x[i - 1]) * (y[i] + y[i - 1]) / 2
    return total


def sizes_for(total: int, fractions: Sequence[float] = FRACTIONS) -> list[int]:
    """Distinct component counts for the fractions (0 and all always included)."""
    if total < 1:
        raise WorkbenchError("the graph has no components to score")
    ks = {0, total}
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise WorkbenchError(f"circuit size {f}: give shares of the components between 0 and 1")
        ks.add(min(total, max(1 if f > 0 else 0, round(f * total))))
    return sorted(ks)


def order_of(scores: torch.Tensor, ranking: Ranking = "abs") -> torch.Tensor:
    """Component indices from the most to the least important (ties broken by index: deterministic)."""
    key = scores.abs() if ranking == "abs" else scores
    return torch.tensor(sorted(range(len(key)), key=lambda i: (-float(key[i]), i)), dtype=torch.long)


def keep_top(order: torch.Tensor, k: int, total: int) -> torch.Tensor:
    keep = torch.zeros(total, dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def faithfulness_curve(runner: CircuitRunner, level: Level, order: torch.Tensor, *,
                       fractions: Sequence[float] = FRACTIONS, progress: bool = False) -> FaithfulnessCurve:
    """Faithfulness of the top-k circuits of `order` at each size."""
    total = len(runner.graph.components(level))
    values = []
    for k in progress_bar(sizes_for(total, fractions), desc="faithfulness", unit="size", enabled=progress):
        values.append(runner.faithfulness(runner.run(keep_top(order, k, total), level)))
    return FaithfulnessCurve(tuple(sizes_for(total, fractions)), total, tuple(values))


def random_curve(runner: CircuitRunner, level: Level, *, draws: int = 5, seed: int = 0,
                 fractions: Sequence[float] = FRACTIONS, progress: bool = False) -> FaithfulnessCurve:
    """The mean faithfulness of `draws` random circuits at each size (nested: each draw is one random order)."""
    if draws < 1:
        raise WorkbenchError(f"random circuits with draws={draws}: give at least 1")
    total = len(runner.graph.components(level))
    g = torch.Generator().manual_seed(seed)
    curves = []
    for _ in progress_bar(range(draws), desc="random circuits", unit="draw", enabled=progress):
        order = torch.randperm(total, generator=g)
        curves.append(faithfulness_curve(runner, level, order, fractions=fractions).faithfulness)
    mean = torch.tensor(curves, dtype=torch.float64).mean(0)
    return FaithfulnessCurve(tuple(sizes_for(total, fractions)), total, tuple(float(v) for v in mean))


def smallest_faithful(runner: CircuitRunner, level: Level, order: torch.Tensor, *, target: float = 0.9) -> tuple[int, float]:
    """The smallest k whose top-k circuit reaches `target` faithfulness, by bisection over k (faithfulness
    need not rise monotonically with k: this finds a k that reaches it where k - 1 does not)."""
    total = len(runner.graph.components(level))
    lo, hi = -1, total
    best = runner.faithfulness(runner.clean_metric)  # the full circuit is the clean model
    while hi - lo > 1:
        mid = (lo + hi) // 2
        value = runner.faithfulness(runner.run(keep_top(order, mid, total), level))
        if value >= target:
            hi, best = mid, value
        else:
            lo = mid
    return hi, best
