"""Circuits as weight edits: a circuit's heads, MLPs or CNN channels replaced by a constant, folded into weights.

A node replaced by a constant c (its mean over reference inputs, zero, or a fixed reference
activation: "patch ablation") folds exactly where a layer next to it has the weights and bias
to write c whatever its input is:

- head `a{L}.h{H}`: its d_head input columns of the attention output projection are zeroed and
  W_O[:, head] c is added to that projection's bias;
- MLP `m{L}`: the MLP's output projection has its weight zeroed and c added to its bias;
- CNN channel `SITE.cJ`: written by the BatchNorm in front of its ReLU (relu(c) = c for c >= 0;
  a residual block's projection shortcut is edited too), or, for zero, read by the next
  layers' weight columns.

All of it goes through the planner that unit ablation, steering and erasure share
(`editors.folding`, via `editors.unit_ablation.multi_site_delta`, which folds sites in network
order so read- and write-side edits of one parameter compose). Constants are taken on the
unedited model, once for all nodes, so ablating several nodes at once equals the run-time
edit `ablation_hook` (every node set to its constant, whatever runs upstream); each fit is
checked against that hook on a random input.

Refused, with the reason (`NotFoldableError`), never approximated: edges (ablating u -> v
patches u's write into v alone, and no weight holds that: ablate the sender nodes, or run the
edge circuit with `workbench.circuits.CircuitRunner`); the embeddings (`input`, the residual
stream); a non-zero constant where no bias can take it (Llama's bias-free `o_proj` and
`down_proj`: use value "zero"; a channel whose block adds an identity shortcut, read only by
padded convolutions). `ablation_hook` does any of these at run time.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from editors.folding import NotFoldableError
from editors.registry import register
from editors.unit_ablation import multi_site_delta, removed_units
from workbench.circuits.components import ComponentGraph, cnn_graph, component_graph
from workbench.circuits.graph import Circuit
from workbench.delta import WeightDelta, assert_unchanged
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle

log = logging.getLogger(__name__)

Value = Literal["mean", "zero"]
VALUES: tuple[str, ...] = ("mean", "zero")

_CHANNEL = re.compile(r"^(?P<site>.+)\.c(?P<unit>\d+)$")
_HEAD = re.compile(r"^a(?P<layer>\d+)\.h(?P<head>\d+)$")
_MLP = re.compile(r"^m(?P<layer>\d+)$")


@dataclass(frozen=True)
class CircuitAblationRequest:
    """Which nodes of a circuit to ablate, and the inputs their means are taken over.

    Default: the circuit's nodes (an edge circuit's senders). `nodes` names them instead; `top`
    takes the `top` best-scored nodes (`ranking`: the circuit's own, "abs", or "signed", which
    keeps the nodes that push the metric up, e.g. toward a trojan's target); `complement`
    ablates every other node of the model's graph. `reference`: texts or an image tensor (needed for value "mean"). `values`: node ->
    a fixed activation (a head's d_head vector, an MLP's d_model vector, a channel's scalar)
    that replaces the chosen value for that node (patch ablation).
    """

    circuit: Circuit
    nodes: tuple[str, ...] | None = None
    top: int | None = None
    ranking: str | None = None
    complement: bool = False
    reference: Any = None
    values: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class NodeAblation:
    """Nodes resolved to (site, unit) pairs, with the constant every unit of each site takes."""

    nodes: tuple[str, ...]
    pairs: tuple[tuple[str, int], ...]
    values: dict[str, torch.Tensor]  # site -> one constant per unit of the site (full width)


# --------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------


def circuit_graph(handle: ModelHandle, circuit: Circuit) -> ComponentGraph:
    """The component graph the circuit was found on: the residual graph, or the CNN channel sites it names."""
    if handle.kind == "image_classifier":
        sites: list[str] = []
        for name in circuit.components:
            m = _CHANNEL.match(name)
            if m is None:
                raise WorkbenchError(f"circuit component {name!r} is not a channel (SITE.cINDEX), but "
                                     f"{handle.spec} is a CNN; give a circuit found on this model")
            if m["site"] not in sites:
                sites.append(m["site"])
        return cnn_graph(handle, sites)
    return component_graph(handle)


def ablatable(graph: ComponentGraph) -> list[str]:
    """The graph's nodes that a constant can replace: heads, MLPs, channels (not the embeddings)."""
    return [n for n in graph.nodes if n != "input"]


def node_ranking(circuit: Circuit, ranking: str | None = None) -> list[str]:
    """The circuit's nodes, best first: by score (node circuits), or by the summed scores of each
    sender's edges (edge circuits); by |score|, or by signed score (`ranking`, default the circuit's)."""
    ranking = circuit.ranking if ranking is None else ranking
    if ranking not in ("abs", "signed"):
        raise WorkbenchError(f"unknown ranking {ranking!r}; expected abs or signed")
    signed = ranking == "signed"
    if circuit.level == "node":
        totals = dict(zip(circuit.components, circuit.scores))
    else:
        totals = {}
        for comp, score in zip(circuit.components, circuit.scores):
            sender = comp.split("->", 1)[0]
            totals[sender] = totals.get(sender, 0.0) + (score if signed else abs(score))
    key = (lambda p: (-p[1], p[0])) if signed else (lambda p: (-abs(p[1]), p[0]))
    return [n for n, _ in sorted(totals.items(), key=key) if n != "input"]


def circuit_nodes(circuit: Circuit) -> list[str]:
    """The circuit's own nodes to ablate: kept nodes, or the senders of kept edges (not the embeddings)."""
    if circuit.level == "node":
        chosen = circuit.nodes
    else:
        chosen = list(dict.fromkeys(u for u, _ in circuit.edges))
    return [n for n in chosen if n != "input"]


def select_nodes(circuit: Circuit, graph: ComponentGraph, *, nodes: Sequence[str] | None = None, top: int | None = None,
                 ranking: str | None = None, complement: bool = False) -> list[str]:
    """The nodes a request names (see `CircuitAblationRequest`), checked against the graph, in graph order."""
    if nodes is not None and top is not None:
        raise WorkbenchError("give either nodes or top, not both")
    known = set(graph.nodes)
    if nodes is not None:
        chosen = [str(n).strip() for n in nodes]
        for n in chosen:
            if n == "input":
                raise NotFoldableError("node 'input' is the embeddings, i.e. the residual stream: a constant there cannot be "
                                       "folded into weights; choose heads (a1.h2), MLPs (m0) or channels, or use ablation_hook")
            if n not in known:
                raise WorkbenchError(f"unknown node {n!r}; this model's nodes are e.g. {', '.join(ablatable(graph)[:6])}")
        if len(set(chosen)) != len(chosen):
            raise WorkbenchError(f"nodes repeat in {chosen}; give each once")
    elif top is not None:
        ranked = node_ranking(circuit, ranking)
        if not 1 <= top <= len(ranked):
            raise WorkbenchError(f"top {top}: give a count from 1 to {len(ranked)} (the circuit scores {len(ranked)} nodes)")
        chosen = ranked[:top]
    else:
        chosen = circuit_nodes(circuit)
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise WorkbenchError(f"the circuit names node {unknown[0]!r}, which this model's graph lacks; find the circuit on this model")
    if complement:
        inside = set(chosen)
        chosen = [n for n in ablatable(graph) if n not in inside]
    order = {n: i for i, n in enumerate(graph.nodes)}
    chosen = sorted(chosen, key=order.__getitem__)
    if not chosen:
        raise WorkbenchError("the selection is empty (no node to ablate); name nodes, give top K >= 1, or a circuit that "
                             "keeps at least one head, MLP or channel")
    return chosen


def node_units(graph: ComponentGraph, node: str, width: int | None = None) -> tuple[str, list[int]]:
    """The site a node lives at and its units there: a head's d_head input columns of the output
    projection, an MLP's whole output (`width` units), one channel."""
    if graph.kind == "cnn":
        m = _CHANNEL.match(node)
        if m is None:
            raise WorkbenchError(f"{node!r} is not a channel node (SITE.cINDEX)")
        return m["site"], [int(m["unit"])]
    head, mlp = _HEAD.match(node), _MLP.match(node)
    if head is not None:
        layer, h = int(head["layer"]), int(head["head"])
        return graph.head_sites[layer], list(range(h * graph.d_head, (h + 1) * graph.d_head))
    if mlp is not None:
        if width is None:
            raise WorkbenchError("an MLP node's width (d_model) is needed")
        return graph.mlp_sites[int(mlp["layer"])], list(range(width))
    raise NotFoldableError(f"node {node!r} is not a head (aL.hH), an MLP (mL) or a channel; the embeddings (input) "
                           "cannot be folded into weights")


def _site_width(handle: ModelHandle, site: str) -> int:
    from workbench.unit_selection import site_units

    return site_units(handle, site)


def _site_means(handle: ModelHandle, sites: Sequence[str], reference: Any) -> dict[str, torch.Tensor]:
    """Each site's per-unit mean over the reference inputs (texts: mean over real tokens, then over
    examples; images: over positions and images), on the model as it is."""
    from workbench.unit_selection import unit_activations

    if reference is None:
        raise WorkbenchError("value 'mean' needs reference inputs (texts, or an image tensor) to take the means over; "
                             "give reference=..., or use value='zero'")
    if isinstance(reference, (list, tuple)) and not reference:
        raise WorkbenchError("the reference inputs are empty; give at least one text or image")
    return {s: unit_activations(handle, s, reference).mean(0).float() for s in sites}


def resolve_ablation(handle: ModelHandle, request: CircuitAblationRequest, value: str = "mean",
                     graph: ComponentGraph | None = None) -> NodeAblation:
    """The request's nodes as (site, unit) pairs with their constants (means on the model as it is)."""
    if value not in VALUES:
        raise WorkbenchError(f"unknown ablation value {value!r}; expected one of {', '.join(VALUES)}")
    graph = circuit_graph(handle, request.circuit) if graph is None else graph
    nodes = select_nodes(request.circuit, graph, nodes=request.nodes, top=request.top, ranking=request.ranking,
                         complement=request.complement)
    given = dict(request.values or {})
    stray = sorted(set(given) - set(nodes))
    if stray:
        raise WorkbenchError(f"values given for node(s) {stray} that are not ablated; give values only for chosen nodes")
    widths: dict[str, int] = {}
    placed: list[tuple[str, str, list[int]]] = []
    for node in nodes:
        if graph.kind == "transformer" and _MLP.match(node):
            site = graph.mlp_sites[int(node[1:])]
            widths.setdefault(site, _site_width(handle, site))
            site, units = node_units(graph, node, widths[site])
        else:
            site, units = node_units(graph, node)
            widths.setdefault(site, _site_width(handle, site))
        if units[-1] >= widths[site]:
            raise WorkbenchError(f"node {node!r} is out of range: {site} has {widths[site]} units")
        placed.append((node, site, units))
    need_means = value == "mean" and any(n not in given for n in nodes)
    means = _site_means(handle, list(dict.fromkeys(s for n, s, _ in placed if n not in given)), request.reference) \
        if need_means else {}
    values = {s: torch.zeros(w) for s, w in widths.items()}
    pairs: list[tuple[str, int]] = []
    for node, site, units in placed:
        idx = torch.tensor(units)
        if node in given:
            v = torch.as_tensor(given[node], dtype=torch.float32).detach().cpu().reshape(-1)
            if v.numel() != len(units):
                raise WorkbenchError(f"the value for {node!r} has {v.numel()} entries; it needs {len(units)} "
                                     "(a head: d_head, an MLP: d_model, a channel: 1)")
            if not bool(torch.isfinite(v).all()):
                raise WorkbenchError(f"the value for {node!r} has NaN or infinite entries; give finite numbers")
            values[site][idx] = v
        elif value == "mean":
            values[site][idx] = means[site][idx].cpu()
        pairs += [(site, u) for u in units]
    return NodeAblation(tuple(nodes), tuple(pairs), values)


@contextmanager
def ablation_hook(handle: ModelHandle, ablation: NodeAblation) -> Iterator[None]:
    """The run-time twin of the folded edit (exact for any node and value, edges excepted)."""
    with removed_units(handle, ablation.pairs, ablation.values):
        yield


def random_nodes(graph: ComponentGraph, count: int, *, exclude: Sequence[str] = (), seed: int = 0,
                 like: Sequence[str] | None = None) -> list[str]:
    """`count` nodes drawn at random (seeded), none of `exclude`: the control of an ablation.

    With `like`, as many per kind as `like` has (heads, MLPs; per channel site for a CNN), so the
    control removes the same amount of each thing."""
    def kind(n: str) -> str:
        if graph.kind == "cnn":
            m = _CHANNEL.match(n)
            return m["site"] if m else n
        return "head" if _HEAD.match(n) else "mlp"

    out = set(exclude)
    pool = [n for n in ablatable(graph) if n not in out]
    gen = torch.Generator().manual_seed(seed)
    if like is None:
        if count > len(pool):
            raise WorkbenchError(f"{count} random nodes asked for, {len(pool)} available")
        return [pool[int(i)] for i in torch.randperm(len(pool), generator=gen)[:count]]
    chosen: list[str] = []
    for k in dict.fromkeys(kind(n) for n in like):
        want = sum(kind(n) == k for n in like)
        candidates = [n for n in pool if kind(n) == k]
        if want > len(candidates):
            raise WorkbenchError(f"{want} random {k} nodes asked for, {len(candidates)} available outside the selection")
        chosen += [candidates[int(i)] for i in torch.randperm(len(candidates), generator=gen)[:want]]
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(chosen, key=order.__getitem__)


# --------------------------------------------------------------------------------------
# The editor
# --------------------------------------------------------------------------------------


@register("circuit-ablate")
@dataclass(frozen=True)
class CircuitAblation:
    """Replace a circuit's nodes by their mean (or zero, or a given activation), folded into a WeightDelta.

    `fit(handle, CircuitAblationRequest(circuit, ...))` refuses a circuit found on other weights
    (fingerprint), and any node whose constant has no exact weight edit (see the module docstring).
    """

    value: Value = "mean"
    verify: bool = True

    name: ClassVar[str] = "circuit-ablate"

    def __post_init__(self) -> None:
        if self.value not in VALUES:
            raise WorkbenchError(f"unknown ablation value {self.value!r}; expected one of {', '.join(VALUES)}")

    def fit(self, handle: ModelHandle, request: CircuitAblationRequest) -> WeightDelta:
        if not isinstance(request, CircuitAblationRequest):
            raise WorkbenchError("circuit-ablate needs a CircuitAblationRequest(circuit, nodes=..., top=..., reference=...)")
        circuit = request.circuit
        circuit.check_model(handle)
        model = handle.model
        with assert_unchanged(model) as guard:
            graph = circuit_graph(handle, circuit)
            ablation = resolve_ablation(handle, request, self.value, graph)
            try:
                parts = multi_site_delta(handle, ablation.pairs, ablation.values)
            except NotFoldableError as exc:
                raise NotFoldableError(f"ablating {_describe(ablation.nodes)} with value {self.value!r} cannot be folded "
                                       f"into weights exactly: {exc} | the run-time twin "
                                       "editors.circuit_ablation.ablation_hook does it exactly") from None
        info = {"circuit": {"model": circuit.model, "task": circuit.task, "method": circuit.method, "level": circuit.level,
                            "fingerprint": circuit.fingerprint},
                "nodes": list(ablation.nodes), "value": self.value,
                "patched": sorted((request.values or {}).keys()), "complement": request.complement,
                "top": request.top, "ranking": request.ranking, "params": sorted(parts.changes)}
        delta = WeightDelta.from_model(model, {n: parts.dense(n) for n in parts.changes}, method=self.name,
                                       request={"nodes": list(ablation.nodes), "value": self.value,
                                                "complement": request.complement, "top": request.top},
                                       extra=info, guard=guard)
        if self.verify:
            _verify(handle, ablation, delta)
        log.info("circuit-ablate %s (%s): %s", _describe(ablation.nodes), self.value, sorted(parts.changes))
        return delta


def _describe(nodes: Sequence[str]) -> str:
    shown = ", ".join(nodes[:8])
    return f"{len(nodes)} node(s) ({shown}{', ...' if len(nodes) > 8 else ''})"


def _test_input(handle: ModelHandle) -> Any:
    from workbench.models import dummy_input

    x = dummy_input(handle, batch_size=2)
    if isinstance(x, torch.Tensor) and handle.preprocess is not None:
        lo, hi = handle.preprocess.input_range
        x = (lo + (hi - lo) * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))).to(x.device)
    return x


def _verify(handle: ModelHandle, ablation: NodeAblation, delta: WeightDelta) -> None:
    """The folded edit must match the run-time hook on a random input (else a bug: say so)."""
    from workbench.circuits.tasks import logits_of
    from workbench.models import run_model

    x = _test_input(handle)
    model = handle.model
    with torch.no_grad():
        with ablation_hook(handle, ablation):
            want = logits_of(run_model(model, x)).float()
        with delta.applied(model):
            got = logits_of(run_model(model, x)).float()
    err = float((want - got).abs().max())
    if err > 1e-4 * float(want.abs().max().clamp(min=1.0)):
        raise WorkbenchError(f"internal check failed: the folded circuit ablation differs from the run-time hook by {err:.3g}; "
                             "please report this. The run-time ablation_hook is exact.")


__all__ = ["VALUES", "CircuitAblation", "CircuitAblationRequest", "NodeAblation", "ablatable", "ablation_hook", "circuit_graph",
           "circuit_nodes", "node_ranking", "node_units", "random_nodes", "resolve_ablation", "select_nodes"]
