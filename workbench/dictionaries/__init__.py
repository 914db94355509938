"""Sparse dictionaries (SAEs and transcoders) as findings: trained on a site, saved in SAELens's format,
measured, and judged against a world's ground truth. A latent is a finding that editors (ablate,
steer) and adversaries (exemplars, feature visualization of its encoder row) consume.

    from workbench.dictionaries import TrainConfig, train_dictionary, ground_truth_table
    h = wb.load("zoo:shapesnet")
    trained = train_dictionary(h, "layer2", TrainConfig(kind="topk", width=256, k=8))
    trained.quality["explained_variance"], trained.path        # cfg.json + sae_weights.safetensors
    table = ground_truth_table(h, trained.dictionary)            # best latent vs diff-in-means vs probe

Modules: `sae` (the dictionary, its kinds and SAELens-compatible files), `activations` (streams of
activations from a world or a corpus), `train` (streamed, resumable, cached training), `quality`
(L0, explained variance, spliced-in loss and accuracy, dead and dense latents), `ground_truth`
(per-feature detection against labels, and the blind search for trojan-trigger latents).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "SparseDictionary": "workbench.dictionaries.sae",
    "DictionaryConfig": "workbench.dictionaries.sae",
    "KINDS": "workbench.dictionaries.sae",
    "load_dictionary": "workbench.dictionaries.sae",
    "ActivationSource": "workbench.dictionaries.activations",
    "default_source": "workbench.dictionaries.activations",
    "world_source": "workbench.dictionaries.activations",
    "text_source": "workbench.dictionaries.activations",
    "TrainConfig": "workbench.dictionaries.train",
    "TrainedDictionary": "workbench.dictionaries.train",
    "DictionaryTrainer": "workbench.dictionaries.train",
    "train_dictionary": "workbench.dictionaries.train",
    "DictionaryQuality": "workbench.dictionaries.quality",
    "dictionary_quality": "workbench.dictionaries.quality",
    "spliced": "workbench.dictionaries.quality",
    "LabelledExamples": "workbench.dictionaries.ground_truth",
    "GroundTruthTable": "workbench.dictionaries.ground_truth",
    "world_examples": "workbench.dictionaries.ground_truth",
    "load_labelled_examples": "workbench.dictionaries.ground_truth",
    "ground_truth_table": "workbench.dictionaries.ground_truth",
    "trigger_search": "workbench.dictionaries.ground_truth",
    "latent_logit_effects": "workbench.dictionaries.ground_truth",
    "check_dictionary_fits": "workbench.dictionaries.ground_truth",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'workbench.dictionaries' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
