"""Circuit discovery: which heads, MLPs or channels (and which edges between them) carry a behaviour.

`find_circuit(handle, task_for(handle, "facts"), DiscoveryConfig(method="eap-ig"))` ranks the
components of the model's graph (`components`) by attribution patching (`attribution`) or
prunes them by measured patching (`acdc`), runs the model with only the circuit clean
(`patching`), and scores the method MIB's way (`scoring`); the result is a `Circuit` (`graph`)
saved as JSON and drawn by `plots`.
"""

from workbench.circuits.acdc import ACDCResult, acdc
from workbench.circuits.attribution import attribution_scores, edge_scores, node_scores
from workbench.circuits.components import ComponentGraph, component_graph
from workbench.circuits.discovery import METHODS, DiscoveryConfig, find_circuit
from workbench.circuits.graph import Circuit
from workbench.circuits.patching import CircuitRunner
from workbench.circuits.scoring import FRACTIONS, FaithfulnessCurve, area, faithfulness_curve, random_curve
from workbench.circuits.tasks import (
    CircuitTask,
    ClassLogit,
    LogitDifference,
    facts_task,
    file_task,
    task_for,
    trojan_task,
)

__all__ = [
    "FRACTIONS",
    "METHODS",
    "ACDCResult",
    "Circuit",
    "CircuitRunner",
    "CircuitTask",
    "ClassLogit",
    "ComponentGraph",
    "DiscoveryConfig",
    "FaithfulnessCurve",
    "LogitDifference",
    "acdc",
    "area",
    "attribution_scores",
    "component_graph",
    "edge_scores",
    "facts_task",
    "faithfulness_curve",
    "file_task",
    "find_circuit",
    "node_scores",
    "random_curve",
    "task_for",
    "trojan_task",
]
