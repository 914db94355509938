"""Weight-edit methods: each turns a finding into a `WeightDelta`.

    from editors import ROME, MEMIT
    delta = ROME(layer=0).fit(handle, rewrite)      # the model is left unchanged
    with delta.applied(handle.model): ...          # bit-exact revert on exit

Importing the package registers every editor in `editors.registry` (name -> class), so the
command line, the protocols and the case studies find a method by name in one table.
"""

from editors.circuit_ablation import CircuitAblation
from editors.concept_erasure import ConceptErasure
from editors.finetune import FineTune, FineTuneL
from editors.knowledge_neuron_edit import KnowledgeNeuronEdit
from editors.latent_edit import LatentAblation, LatentSteering
from editors.memit import MEMIT
from editors.registry import Editor, available, get, register
from editors.rome import ROME
from editors.rule_rewrite import RuleRewrite
from editors.steering import Steering
from editors.unit_ablation import UnitAblation

__all__ = ["MEMIT", "ROME", "CircuitAblation", "ConceptErasure", "Editor", "FineTune", "FineTuneL", "KnowledgeNeuronEdit", "LatentAblation", "LatentSteering", "RuleRewrite",
           "Steering", "UnitAblation", "available", "get", "register"]
