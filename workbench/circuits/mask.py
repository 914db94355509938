"""A learned mask (continuous sparsification, Savarese et al. 2020; MIB's mask-optimization family).

Every component gets a logit s; the model runs with each component sigmoid(beta * s) of the way
from its corrupted to its own value (`CircuitRunner.run_soft`), and gradient descent lowers

    (1 - faithfulness)^2  +  sparsity * mean(sigmoid(beta * s))

while beta grows geometrically from 1 to `beta_final`, so the gates end close to 0 or 1. The
circuit is the components with s > 0; s is the score (higher: more needed). Seeded: the
starting logits are `init` plus small noise from the seed, so ties break the same way each run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.circuits.components import Level
from workbench.circuits.patching import CircuitRunner
from workbench.errors import WorkbenchError, check_finite
from workbench.progress import progress_bar


@dataclass(frozen=True)
class MaskConfig:
    steps: int = 100
    lr: float = 0.1
    sparsity: float = 0.5
    init: float = 2.0
    beta_final: float = 50.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("lr", "sparsity", "init", "beta_final"):
            check_finite(f"MaskConfig {name}", getattr(self, name))
        if self.steps < 1 or self.lr <= 0 or self.sparsity < 0 or self.beta_final < 1:
            raise WorkbenchError(f"mask settings steps={self.steps}, lr={self.lr}, sparsity={self.sparsity}, "
                                 f"beta_final={self.beta_final}: expected steps >= 1, lr > 0, sparsity >= 0, beta_final >= 1")


@dataclass(frozen=True)
class MaskResult:
    scores: torch.Tensor  # float64 logits, per component
    keep: torch.Tensor  # bool, s > 0
    faithfulness: float  # of the kept (hard) circuit
    losses: tuple[float, ...]


def learn_mask(runner: CircuitRunner, level: Level, config: MaskConfig | None = None, *,
               progress: bool = False) -> MaskResult:
    """Learn component gates that keep the behaviour with as few components as the sparsity weight allows."""
    config = MaskConfig() if config is None else config
    n = len(runner.graph.components(level))
    g = torch.Generator().manual_seed(config.seed)
    logits = (config.init + 0.01 * torch.randn(n, generator=g, dtype=torch.float32)).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=config.lr)
    span = runner.clean_metric - runner.corrupted_metric
    params = [p for p in runner.model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    losses = []
    try:
        for step in progress_bar(range(config.steps), desc="mask", unit="step", enabled=progress):
            beta = config.beta_final ** (step / max(1, config.steps - 1))
            gates = torch.sigmoid(beta * logits)
            with torch.enable_grad():
                metric = runner.run_soft(gates, level)
                faithful = (metric - runner.corrupted_metric) / span
                loss = (1.0 - faithful) ** 2 + config.sparsity * gates.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        for p in params:
            p.requires_grad_(True)
    scores = logits.detach().double()
    keep = scores > 0
    faithfulness = runner.faithfulness(runner.run(keep, level))
    return MaskResult(scores, keep, faithfulness, tuple(losses))
