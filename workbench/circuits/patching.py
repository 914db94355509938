"""Running a model with a circuit: everything outside it patched to its corrupted value.

Node level: a node outside the circuit (a head's slice of the attention output projection's
input, an MLP's output, the embeddings, a CNN channel) takes its value from the corrupted run.
Edge level: a receiver reads, from each sender outside the circuit, that sender's corrupted
output instead of its output in this run:

    x_v  <-  x_v - sum over removed edges (u -> v) of (out_u(this run) - out_u(corrupted run))

so a receiver with every edge removed reads exactly its corrupted input, and with none removed
the run is the clean one (MIB's and ACDC's edge semantics). The same taps give the gradients
attribution patching needs: each receiver reads a private copy of the residual stream, so the
gradient at that copy is the gradient through that receiver alone, not through the skip path.
Everything goes through `workbench.hooks.patch`, so hooks are gone on every exit path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from workbench.circuits.components import ComponentGraph, Level, head_out_weights
from workbench.circuits.tasks import CircuitTask, logits_of
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.hooks import patch
from workbench.models import run_model


class CircuitRunner:
    """One model, one component graph, one task: metric of the clean, corrupted and patched runs."""

    def __init__(self, handle: ModelHandle, graph: ComponentGraph, task: CircuitTask) -> None:
        self.handle = handle
        self.model = handle.model
        self.graph = graph
        self.task = task
        self._weights = head_out_weights(self.model, graph) if graph.kind == "transformer" else []
        self._receiver_senders = graph.receiver_senders() if graph.kind == "transformer" else {}
        self._edge_index = {e: i for i, e in enumerate(graph.edges)}
        self._clean_nodes: dict[str, torch.Tensor] | None = None
        self._corrupt_nodes: dict[str, torch.Tensor] | None = None
        self.forward_passes = 0
        with torch.no_grad():
            self.clean_metric = self.metric(self._run(task.clean))
            self.corrupted_metric = self.metric(self._run(task.corrupted))
        if abs(self.clean_metric - self.corrupted_metric) < 1e-6:
            raise WorkbenchError(f"task {task.name!r}: the metric is {self.clean_metric:.4g} on clean and corrupted "
                                 "inputs alike, so there is no behaviour to explain; choose pairs the model tells apart")

    # -- running ----------------------------------------------------------------------------
    def _run(self, inputs: Any) -> torch.Tensor:
        self.forward_passes += 1
        if isinstance(inputs, dict):
            inputs = {**inputs, "use_cache": False}
        return logits_of(run_model(self.model, inputs))

    def metric(self, logits: torch.Tensor) -> float:
        return float(self.task.metric(logits))

    def faithfulness(self, value: float) -> float:
        """(m(circuit) - m(corrupted)) / (m(clean) - m(corrupted)): 1 for the full model, 0 for none of it."""
        return (value - self.corrupted_metric) / (self.clean_metric - self.corrupted_metric)

    # -- node values -------------------------------------------------------------------------
    def node_sites(self) -> list[str]:
        g = self.graph
        if g.kind == "cnn":
            return [site for site, _ in g.cnn_sites]
        return [g.embed_site, *g.head_sites, *g.mlp_sites]

    def _capture(self, inputs: Any, sites: Sequence[str]) -> dict[str, torch.Tensor]:
        store: dict[str, torch.Tensor] = {}

        def keep(act: torch.Tensor, *, site: Any) -> None:
            store[site.name] = act.detach().clone()

        with torch.no_grad(), patch(self.handle, {s: keep for s in sites}):
            self._run(inputs)
        return store

    def clean_nodes(self) -> dict[str, torch.Tensor]:
        if self._clean_nodes is None:
            self._clean_nodes = self._capture(self.task.clean, self.node_sites())
        return self._clean_nodes

    def corrupted_nodes(self) -> dict[str, torch.Tensor]:
        if self._corrupt_nodes is None:
            self._corrupt_nodes = self._capture(self.task.corrupted, self.node_sites())
        return self._corrupt_nodes

    def node_parts(self) -> list[tuple[str, int, int]]:
        """(site, first node index, number of nodes) for each node site, in node order."""
        g = self.graph
        if g.kind == "cnn":
            out, start = [], 0
            for site, width in g.cnn_sites:
                out.append((site, start, width))
                start += width
            return out
        parts = [(g.embed_site, 0, 1)]
        index = {name: i for i, name in enumerate(g.nodes)}
        for layer in range(g.n_layers):
            parts.append((g.head_sites[layer], index[f"a{layer}.h0"], g.n_heads))
            parts.append((g.mlp_sites[layer], index[f"m{layer}"], 1))
        return parts

    # -- patched runs --------------------------------------------------------------------------
    def run_nodes(self, keep: torch.Tensor) -> float:
        """Metric with every node outside `keep` (bool per graph node) set to its corrupted value."""
        corrupt = self.corrupted_nodes()
        patches: dict[str, Callable[..., torch.Tensor]] = {}
        for site, start, count in self.node_parts():
            k = keep[start:start + count]
            if bool(k.all()):
                continue
            patches[site] = self._node_patch(corrupt[site], k)
        with torch.no_grad(), patch(self.handle, patches):
            return self.metric(self._run(self.task.clean))

    def _node_patch(self, corrupt: torch.Tensor, k: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        count = k.numel()

        def fn(act: torch.Tensor) -> torch.Tensor:
            if self.graph.kind == "cnn":
                mask = k.to(act.device).view(1, count, *([1] * (act.ndim - 2)))
                return torch.where(mask, act, corrupt)
            if count == 1:
                return act if bool(k[0]) else corrupt
            shape = act.shape
            a = act.reshape(*shape[:-1], count, shape[-1] // count)
            c = corrupt.reshape(a.shape)
            return torch.where(k.to(act.device).view(count, 1), a, c).reshape(shape)

        return fn

    # -- edges -----------------------------------------------------------------------------------
    def sender_sites(self) -> list[str]:
        g = self.graph
        return [g.embed_site, *g.head_sites, *g.mlp_sites]

    def receiver_sites(self) -> list[str]:
        g = self.graph
        out = []
        for layer in range(g.n_layers):
            out += [g.attn_in_sites[layer], g.mlp_in_sites[layer]]
        return [*out, g.final_site]

    @torch.no_grad()
    def sender_deltas(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first sender index, clean minus corrupted writes (batch, positions, senders, d_model)) per block
        of senders: the embeddings, one layer's heads, one MLP, in sender order."""
        g = self.graph
        clean, corrupt = self.clean_nodes(), self.corrupted_nodes()
        yield 0, (clean[g.embed_site] - corrupt[g.embed_site]).unsqueeze(2)
        start = 1
        for layer in range(g.n_layers):
            site = g.head_sites[layer]
            dz = clean[site] - corrupt[site]
            dz = dz.reshape(*dz.shape[:-1], g.n_heads, g.d_head)
            yield start, torch.einsum("bthd,hdm->bthm", dz, self._weights[layer].to(dz.dtype))
            start += g.n_heads
            site = g.mlp_sites[layer]
            yield start, (clean[site] - corrupt[site]).unsqueeze(2)
            start += 1

    @contextmanager
    def _edge_hooks(self, keep: torch.Tensor | None, taps: dict[str, torch.Tensor] | None) -> Iterator[None]:
        """Record senders live; at each receiver subtract removed edges' (live - corrupted) writes
        (when `keep` is given) and hand the receiver a private copy kept in `taps`."""
        g = self.graph
        live: dict[str, torch.Tensor] = {}
        corrupt = self.corrupted_nodes() if keep is not None else None
        sender_order = self.sender_sites()

        def record(act: torch.Tensor, *, site: Any) -> None:
            live[site.name] = act

        def receiver(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
            senders = self._receiver_senders[name]
            removed: torch.Tensor | None = None
            if keep is not None:
                cols = torch.tensor([self._edge_index[(g.senders[u], name)] for u in senders], dtype=torch.long)
                removed = (1.0 - keep[cols]) if keep.is_floating_point() else ~keep[cols]
                if removed.dtype == torch.bool and not bool(removed.any()):
                    removed = None

            def fn(act: torch.Tensor) -> torch.Tensor:
                new = act
                if removed is not None and corrupt is not None:
                    if removed.dtype == torch.bool:
                        new = act - self._removed_write(live, corrupt, senders, removed, act)
                    else:
                        new = act - self._weighted_write(live, corrupt, len(senders), removed, act)
                if taps is not None:
                    new = new.clone() if new is act else new
                    taps[name] = new
                return new

            return fn

        patches: dict[str, Any] = {s: record for s in sender_order}
        names = [*(n for layer in range(g.n_layers) for n in (f"a{layer}", f"m{layer}")), "logits"]
        for name, site in zip(names, self.receiver_sites()):
            patches[site] = receiver(name)
        with patch(self.handle, patches):
            yield

    def _removed_write(self, live: dict[str, torch.Tensor], corrupt: dict[str, torch.Tensor], senders: list[int],
                       removed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Sum over removed senders of (this run's write - the corrupted run's write)."""
        g = self.graph
        total = torch.zeros_like(like)
        chosen = {g.senders[u] for u, r in zip(senders, removed.tolist()) if r}
        if "input" in chosen:
            total = total + (live[g.embed_site] - corrupt[g.embed_site])
        for layer in range(g.n_layers):
            heads = [h for h in range(g.n_heads) if f"a{layer}.h{h}" in chosen]
            if heads:
                site = g.head_sites[layer]
                dz = (live[site] - corrupt[site]).reshape(*like.shape[:-1], g.n_heads, g.d_head)
                idx = torch.tensor(heads, device=like.device)
                w = self._weights[layer].to(like.dtype)
                total = total + torch.einsum("bthd,hdm->btm", dz[..., idx, :], w[idx])
            if f"m{layer}" in chosen:
                site = g.mlp_sites[layer]
                total = total + (live[site] - corrupt[site])
        return total

    def _weighted_write(self, live: dict[str, torch.Tensor], corrupt: dict[str, torch.Tensor], count: int,
                        weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Sum over the first `count` senders (a receiver's senders are always a prefix of the graph's) of
        weight x (this run's write - the corrupted run's write); differentiable in the weights."""
        g = self.graph
        blocks = [(live[g.embed_site] - corrupt[g.embed_site]).unsqueeze(2)]
        have = 1
        for layer in range(g.n_layers):
            if have >= count:
                break
            site = g.head_sites[layer]
            dz = (live[site] - corrupt[site]).reshape(*like.shape[:-1], g.n_heads, g.d_head)
            blocks.append(torch.einsum("bthd,hdm->bthm", dz, self._weights[layer].to(like.dtype)))
            have += g.n_heads
            if have >= count:
                break
            site = g.mlp_sites[layer]
            blocks.append((live[site] - corrupt[site]).unsqueeze(2))
            have += 1
        deltas = torch.cat(blocks, dim=2)[:, :, :count]
        return torch.einsum("btsm,s->btm", deltas, weights.to(like.dtype).to(like.device))

    def run_soft(self, keep: torch.Tensor, level: Level) -> torch.Tensor:
        """The metric (a differentiable tensor) with each component `keep` of the way from its corrupted
        to its own value: 1 keeps it, 0 patches it; in between interpolates (learned masks)."""
        if level == "edge":
            with self._edge_hooks(keep, None):
                return self.task.metric(self._run(self.task.clean))
        corrupt = self.corrupted_nodes()
        patches: dict[str, Callable[..., torch.Tensor]] = {}
        for site, start, count in self.node_parts():
            patches[site] = self._soft_node_patch(corrupt[site], keep[start:start + count])
        with patch(self.handle, patches):
            return self.task.metric(self._run(self.task.clean))

    def _soft_node_patch(self, corrupt: torch.Tensor, k: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        count = k.numel()

        def fn(act: torch.Tensor) -> torch.Tensor:
            w = k.to(act.device, act.dtype)
            if self.graph.kind == "cnn":
                return corrupt + w.view(1, count, *([1] * (act.ndim - 2))) * (act - corrupt)
            shape = act.shape
            a = act.reshape(*shape[:-1], count, shape[-1] // count)
            c = corrupt.reshape(a.shape)
            return (c + w.view(count, 1) * (a - c)).reshape(shape)

        return fn

    def run_edges(self, keep: torch.Tensor) -> float:
        """Metric with every edge outside `keep` (bool per graph edge) reading its sender's corrupted write."""
        with torch.no_grad(), self._edge_hooks(keep, None):
            return self.metric(self._run(self.task.clean))

    def run(self, keep: torch.Tensor, level: Level) -> float:
        if keep.dtype != torch.bool:
            raise WorkbenchError("a circuit's keep mask must be boolean, one entry per component")
        n = len(self.graph.components(level))
        if keep.numel() != n:
            raise WorkbenchError(f"keep mask has {keep.numel()} entries; this graph has {n} {level}s")
        return self.run_edges(keep) if level == "edge" else self.run_nodes(keep)

    # -- gradients ---------------------------------------------------------------------------------
    def node_gradients(self, alpha: float = 1.0) -> tuple[dict[str, torch.Tensor], float]:
        """d metric / d node activation on the input alpha of the way from corrupted to clean."""
        sites = self.node_sites()
        taps: dict[str, torch.Tensor] = {}
        entry = self._entry(alpha)

        def tap(act: torch.Tensor, *, site: Any) -> torch.Tensor:
            copy = act.clone()
            taps[site.name] = copy
            return copy

        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            inputs = entry(stack)
            stack.enter_context(patch(self.handle, {s: tap for s in sites}))
            value = self.task.metric(self._run(inputs))
            grads = torch.autograd.grad(value, [taps[s] for s in sites], allow_unused=True)
        out = {s: (g if g is not None else torch.zeros_like(taps[s])).detach() for s, g in zip(sites, grads)}
        return out, float(value.detach())

    def receiver_gradients(self, alpha: float = 1.0) -> tuple[dict[str, torch.Tensor], float]:
        """d metric / d each receiver's private input, on the input alpha of the way from corrupted to clean."""
        taps: dict[str, torch.Tensor] = {}
        entry = self._entry(alpha)
        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            inputs = entry(stack)
            stack.enter_context(self._edge_hooks(None, taps))
            value = self.task.metric(self._run(inputs))
            names = list(self.graph.receivers)
            grads = torch.autograd.grad(value, [taps[n] for n in names], allow_unused=True)
        out = {n: (g if g is not None else torch.zeros_like(taps[n])).detach() for n, g in zip(names, grads)}
        return out, float(value.detach())

    def _entry(self, alpha: float) -> Callable[[ExitStack], Any]:
        """How the differentiated run starts: clean inputs (alpha 1) or an interpolation, with the
        first activation (embeddings; images) a leaf that requires grad so every later one does."""
        g = self.graph

        def start(stack: ExitStack) -> Any:
            if g.kind == "cnn":
                clean, corrupted = self.task.clean, self.task.corrupted
                x = corrupted + alpha * (clean - corrupted) if alpha != 1.0 else clean
                return x.detach().clone().requires_grad_(True)
            clean = self.clean_nodes()[g.embed_site]
            corrupt = self.corrupted_nodes()[g.embed_site] if alpha != 1.0 else clean
            value = (corrupt + alpha * (clean - corrupt)).detach().requires_grad_(True)
            stack.enter_context(patch(self.handle, {g.embed_site: value}))
            return self.task.clean

        return start
