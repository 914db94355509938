"""Model-free toy studies for the harness tests (importable as `tests.casestudy_toys:Name` with the repository root on the path).

`ToyStudy` has a real effect (treatment beats control by `effect`); `NullToy` has none.
`ModelToy` runs on the models of role "toy": each "model" is a dict whose `offset` adds to
the treatment, so models can differ (run it with a `StudyContext` whose `models` hold them).
`SlowToy` sleeps in each case and logs every case start to $TOY_LOG, so a test can kill
the process midway and check what was recomputed. With $TOY_GATE set, each case waits until
that file exists, so a test can hold a run mid-way for as long as it needs. With $TOY_KILL
naming a case key and $TOY_KILL_MARK a file path, the process running that case kills itself
(SIGKILL) the first time, leaving the mark, as a crashed worker would.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch

from workbench.bootstrap import Metric, mean_of, paired_difference
from workbench.casestudy import CaseStudy, Comparison, Control, Prediction, case_seed, ci_above, ci_within


class ToyStudy(CaseStudy):
    name = "toy"
    number = None
    title = "Toy: a method's choice beats a random control"
    hypothesis = "The toy method's action beats a random action of the same size; nothing else moves."
    controls = (Control("random", "a random action of the same size, same code"),)
    methods = ("toy_method",)
    effect = 1.0
    n_cases = 20
    quick_seeds = 2
    default_seeds = 3

    def options(self) -> dict[str, Any]:
        return {"n_cases": self.n_cases, "effect": self.effect}

    def predictions(self) -> list[Prediction]:
        return [
            Prediction("beats_random", "the method's action beats the random one by at least 0.2", "advantage",
                       "increase", ci_above(0.2), size=1.0, method="toy_method", source="toy",
                       basis="finding"),
            Prediction("no_side_effect", "an unrelated quantity stays within +-0.3", "side_effect", "none",
                       ci_within(-0.3, 0.3), size=0.0, basis="guess"),
        ]

    def metrics(self) -> list[Metric]:
        return [paired_difference("advantage", "treatment", "control", description="treatment - control"),
                mean_of("side_effect", "side", description="change of an unrelated quantity")]

    def case_keys(self, state: Any, seed: int) -> list[str]:
        return [f"c{i:03d}" for i in range(self.n_cases)]

    def run_case(self, state: Any, seed: int, key: str) -> dict[str, Any]:
        log = os.environ.get("TOY_LOG")
        if log:
            with open(log, "a") as fh:
                fh.write(f"start s{seed}:{key}\n")
        mark = os.environ.get("TOY_KILL_MARK")
        if mark and key == os.environ.get("TOY_KILL") and not os.path.exists(mark):
            with open(mark, "w") as fh:
                fh.write(f"killed s{seed}:{key} in {os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        gate = os.environ.get("TOY_GATE")
        while gate and not os.path.exists(gate):
            time.sleep(0.02)
        delay = float(os.environ.get("TOY_SLEEP", "0"))
        if delay:
            time.sleep(delay)
        gen = torch.Generator().manual_seed(case_seed(seed, key))
        noise = torch.randn(3, generator=gen, dtype=torch.float64).tolist()
        treatment = self.effect + 0.3 * noise[0]
        control = 0.3 * noise[1]
        comp = Comparison("toy_method", "toy action", "score", treatment, control, "random")
        return {"treatment": treatment, "control": control, "side": 0.05 * noise[2], "comparisons": [comp.to_json()]}


class NullToy(ToyStudy):
    name = "null_toy"
    title = "Toy without an effect"
    effect = 0.0


class SlowToy(ToyStudy):
    name = "slow_toy"
    n_cases = 12


class ModelToy(ToyStudy):
    name = "model_toy"
    world = "toy"

    def setup(self, ctx: Any, model: Any) -> dict[str, Any]:
        return {"offset": float(ctx.model(model.spec)["offset"])}

    def run_case(self, state: Any, seed: int, key: str) -> dict[str, Any]:
        out = super().run_case(state, seed, key)
        treatment = out["treatment"] + state["offset"]
        comp = Comparison("toy_method", "toy action", "score", treatment, out["control"], "random")
        return {**out, "treatment": treatment, "comparisons": [comp.to_json()]}
