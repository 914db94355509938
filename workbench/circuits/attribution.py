"""Attribution patching: every component's patching effect from two forward passes and one backward.

EAP (Syed et al. 2023; Nanda's attribution patching) scores a component by the first-order
change of the metric when its value moves from clean to corrupted:

    score(node)   = sum over positions of (a_clean - a_corrupted) . d metric / d a
    score(u -> v) = sum over positions of (out_u,clean - out_u,corrupted) . d metric / d x_v

where x_v is receiver v's own copy of the residual stream (`patching.CircuitRunner`). A score
is the estimated drop of the metric when the component is patched: positive means it carries
the behaviour. EAP-IG (Hanna et al. 2024; MIB's strongest method) replaces the clean gradient
by its average along the straight path from the corrupted to the clean input embeddings (pixels
for a CNN), at alpha = k / steps for k = 1..steps; with one step it is EAP. (The EAP-IG package
takes k = 0..steps - 1, a left sum whose single step is the gradient at the corrupted input;
both converge to the same integral as steps grow.)
"""

from __future__ import annotations

import torch

from workbench.circuits.components import Level
from workbench.circuits.patching import CircuitRunner
from workbench.errors import WorkbenchError
from workbench.progress import progress_bar


def _alphas(steps: int) -> list[float]:
    if steps < 1:
        raise WorkbenchError(f"integrated gradients with steps={steps}: give at least 1 step (1 is plain EAP)")
    return [k / steps for k in range(1, steps + 1)]


def node_scores(runner: CircuitRunner, *, steps: int = 1, progress: bool = False) -> torch.Tensor:
    """EAP (steps=1) or EAP-IG scores, one per node of the graph (float64)."""
    clean, corrupt = runner.clean_nodes(), runner.corrupted_nodes()
    mean: dict[str, torch.Tensor] = {}
    alphas = _alphas(steps)
    for alpha in progress_bar(alphas, desc="attribution", unit="step", enabled=progress and steps > 1):
        grads, _ = runner.node_gradients(alpha)
        for site, g in grads.items():
            mean[site] = mean.get(site, 0) + g / len(alphas)
    scores = torch.zeros(len(runner.graph.nodes), dtype=torch.float64)
    for site, start, count in runner.node_parts():
        prod = ((clean[site] - corrupt[site]) * mean[site]).double()
        if runner.graph.kind == "cnn":
            per = prod.transpose(0, 1).reshape(count, -1).sum(1)
        elif count == 1:
            per = prod.sum().reshape(1)
        else:
            per = prod.reshape(*prod.shape[:-1], count, -1).sum(-1).reshape(-1, count).sum(0)
        scores[start:start + count] = per.cpu()
    return scores


def edge_scores(runner: CircuitRunner, *, steps: int = 1, progress: bool = False) -> torch.Tensor:
    """EAP (steps=1) or EAP-IG scores, one per edge of the residual graph (float64).

    Sender writes are taken one block (the embeddings, one layer's heads, one MLP) at a time
    against every receiver's gradient, so memory grows with a layer, not with the whole graph.
    """
    graph = runner.graph
    if graph.kind != "transformer":
        graph.components("edge")  # the clear error for CNNs
    mean: dict[str, torch.Tensor] = {}
    alphas = _alphas(steps)
    for alpha in progress_bar(alphas, desc="attribution", unit="step", enabled=progress and steps > 1):
        grads, _ = runner.receiver_gradients(alpha)
        for name, g in grads.items():
            mean[name] = mean.get(name, 0) + g.double() / len(alphas)
    receivers = list(graph.receivers)
    stacked = torch.stack([mean[name] for name in receivers], dim=2)  # (batch, positions, receivers, d_model)
    matrix = torch.zeros(len(graph.senders), len(receivers), dtype=torch.float64)
    for start, delta in runner.sender_deltas():
        matrix[start:start + delta.shape[2]] = torch.einsum("btsd,btrd->sr", delta.double(), stacked).cpu()
    sender_index = {u: i for i, u in enumerate(graph.senders)}
    receiver_index = {v: i for i, v in enumerate(receivers)}
    rows = torch.tensor([sender_index[u] for u, _ in graph.edges])
    cols = torch.tensor([receiver_index[v] for _, v in graph.edges])
    return matrix[rows, cols]


def attribution_scores(runner: CircuitRunner, level: Level, *, steps: int = 1, progress: bool = False) -> torch.Tensor:
    """EAP or EAP-IG scores at `level`, aligned with `runner.graph.components(level)`."""
    if level == "edge":
        return edge_scores(runner, steps=steps, progress=progress)
    return node_scores(runner, steps=steps, progress=progress)
