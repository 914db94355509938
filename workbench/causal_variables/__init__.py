"""Causal variables: where a model represents a variable of its world, found by interchange interventions.

    from workbench.causal_variables import DASConfig, align, world_pairs
    h = wb.load("zoo:factgpt")
    pairs = world_pairs(h, "subject", n=1000, seed=0)          # base, source, counterfactual answer
    result = align(h, pairs, "blocks.0.hook_resid_post", DASConfig(dim=8))
    result.method("das").iia, result.method("random").iia      # held-out interchange accuracy

Modules: `pairs` (interchange pairs from FactWorld and ShapesWorld with known counterfactual
labels), `interchange` (reading a site and swapping a subspace of it), `das` (distributed
alignment search beside probe, LEACE, difference-in-means, SAE and random subspaces).
"""

from __future__ import annotations

from workbench.causal_variables.das import METHODS, AlignmentResult, DASConfig, MethodResult, align, plot_iia, train_das
from workbench.causal_variables.interchange import InterchangeRunner, interchange_hits
from workbench.causal_variables.pairs import (
    FACT_VARIABLES,
    SCENE_VARIABLES,
    InterchangePairs,
    check_variable,
    fact_pairs,
    scene_pairs,
    variables_of,
    world_pairs,
)

__all__ = ["FACT_VARIABLES", "METHODS", "SCENE_VARIABLES", "AlignmentResult", "DASConfig", "InterchangePairs",
           "InterchangeRunner", "MethodResult", "align", "check_variable", "fact_pairs", "interchange_hits", "plot_iia",
           "scene_pairs", "train_das", "variables_of", "world_pairs"]
