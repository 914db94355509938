"""The components a circuit is made of, and where each one reads and writes in a model.

A transformer is a residual graph: *senders* write into the residual stream (`input`, the
embeddings; `a{L}.h{H}`, one attention head; `m{L}`, one MLP) and *receivers* read from it
(`a{L}`, the input of layer L's attention, shared by its heads; `m{L}`, the MLP's input;
`logits`, the final norm's input). An edge joins a sender to a later receiver. Node-level
circuits use the senders themselves. A CNN's nodes are the channels of chosen blocks
(`layer2.c17`); it has no residual graph across blocks, so its circuits are node-level.

Where a site lives is data: each family names the norm in front of its attention and its
MLP (`RECEIVER_NORMS`), the head outputs are the input of the `attn_out` weight's module
and the MLP outputs are the canonical `blocks.{L}.mlp.hook_out`, so adding a family is a
line here and a `SiteMap` in `workbench.sites`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.hooks import run_with_cache
from workbench.models import dummy_input
from workbench.sites import SITE_MAPS, as_out_in, model_and_site_map

Level = Literal["node", "edge"]
GraphKind = Literal["transformer", "cnn"]

# family -> (the norm that reads the residual for attention, the one that reads it for the MLP)
RECEIVER_NORMS: dict[str, tuple[str, str]] = {
    "gpt2": ("transformer.h.{L}.ln_1", "transformer.h.{L}.ln_2"),
    "gpt_neox": ("gpt_neox.layers.{L}.input_layernorm", "gpt_neox.layers.{L}.post_attention_layernorm"),
    "llama": ("model.layers.{L}.input_layernorm", "model.layers.{L}.post_attention_layernorm"),
    **{alias: ("model.layers.{L}.input_layernorm", "model.layers.{L}.post_attention_layernorm")
       for alias in ("mistral", "qwen2", "qwen3")},
}
FINAL_NORM = "ln_final.hook_normalized"


def head_name(layer: int, head: int) -> str:
    return f"a{layer}.h{head}"


@dataclass(frozen=True)
class ComponentGraph:
    """Every node and edge of one model, with the sites that carry them.

    Transformers: `senders` (input, heads, MLPs) and `receivers` (attention inputs, MLP
    inputs, logits) in forward order; `edges` joins each receiver to every sender before it
    (with a parallel residual, as in GPT-NeoX, a layer's MLP reads no head of its layer).
    CNNs: `nodes` are `SITE.cINDEX` channel names, `cnn_sites` the blocks with their widths.
    """

    kind: GraphKind
    nodes: tuple[str, ...]
    senders: tuple[str, ...] = ()
    receivers: tuple[str, ...] = ()
    edges: tuple[tuple[str, str], ...] = ()
    n_layers: int = 0
    n_heads: int = 0
    d_head: int = 0
    parallel: bool = False
    head_sites: tuple[str, ...] = ()  # per layer: `MODULE:input` of the attention output projection
    head_weights: tuple[str, ...] = ()  # per layer: that projection's weight parameter name
    head_layout: str = "out_in"
    mlp_sites: tuple[str, ...] = ()  # per layer: the MLP's output
    attn_in_sites: tuple[str, ...] = ()  # per layer: `NORM:input` in front of attention
    mlp_in_sites: tuple[str, ...] = ()  # per layer: `NORM:input` in front of the MLP
    embed_site: str = "blocks.0.hook_resid_pre"
    final_site: str = ""
    cnn_sites: tuple[tuple[str, int], ...] = ()

    def components(self, level: Level) -> list[str]:
        """The names a circuit at `level` chooses among: nodes, or edges as `SENDER->RECEIVER`."""
        if level == "node":
            return list(self.nodes)
        if self.kind != "transformer":
            raise WorkbenchError("edge-level circuits need a transformer's residual graph; this is a CNN, whose "
                                 "circuits are node-level (channels): use level 'node'")
        return [f"{u}->{v}" for u, v in self.edges]

    def receiver_senders(self) -> dict[str, list[int]]:
        """Receiver -> indices (into `senders`) of the senders that write before it reads: always a prefix
        of `senders` (forward order), which attribution and soft masks rely on."""
        index = {s: i for i, s in enumerate(self.senders)}
        out: dict[str, list[int]] = {r: [] for r in self.receivers}
        for u, v in self.edges:
            out[v].append(index[u])
        for receiver, senders in out.items():
            if senders != list(range(len(senders))):
                raise WorkbenchError(f"receiver {receiver!r} reads senders out of forward order; the graph is malformed")
        return out


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0]


def transformer_graph(handle: ModelHandle) -> ComponentGraph:
    """The residual graph of a GPT-2, GPT-NeoX or Llama-family model."""
    model, site_map = model_and_site_map(handle)
    family = site_map.family if site_map is not None else None
    if site_map is None or family not in RECEIVER_NORMS or family == "bert":
        supported = ", ".join(k for k in SITE_MAPS if k in RECEIVER_NORMS)
        raise WorkbenchError(f"circuits on {handle.spec!r} need a causal transformer family ({supported}); "
                             f"this model's family is {family or getattr(handle.arch, 'family', None)!r}")
    n_layers = site_map.n_layers(model)
    config = getattr(model, "config", None)
    n_heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0) or handle.arch.n_heads or 0)
    weight, layout = site_map.weight(model, "attn_out", 0)
    d_inner = as_out_in(weight, layout).shape[1]
    if n_heads <= 0 or d_inner % n_heads:
        raise WorkbenchError(f"{handle.spec}: cannot split the attention output ({d_inner} wide) into {n_heads} heads")
    parallel = bool(getattr(config, "use_parallel_residual", False)) and family == "gpt_neox"
    attn_norm, mlp_norm = RECEIVER_NORMS[family]
    final_module, _side = site_map.sites["ln_final.hook_normalized"]

    def path(template: str, layer: int | None) -> str:
        found = site_map.module_path(model, template, layer)
        if found is None:
            raise WorkbenchError(f"{handle.spec}: {template} lies outside the loaded model; load the LM-head model")
        return found

    senders = ["input"]
    receivers: list[str] = []
    edges: list[tuple[str, str]] = []
    for layer in range(n_layers):
        before_attn = list(senders)
        heads = [head_name(layer, h) for h in range(n_heads)]
        receivers.append(f"a{layer}")
        edges += [(u, f"a{layer}") for u in before_attn]
        senders += heads
        receivers.append(f"m{layer}")
        edges += [(u, f"m{layer}") for u in (before_attn if parallel else senders)]
        senders.append(f"m{layer}")
    receivers.append("logits")
    edges += [(u, "logits") for u in senders]
    head_weights = tuple(site_map.weight_name(model, "attn_out", layer) for layer in range(n_layers))
    return ComponentGraph(
        kind="transformer",
        nodes=tuple(senders),
        senders=tuple(senders),
        receivers=tuple(receivers),
        edges=tuple(edges),
        n_layers=n_layers,
        n_heads=n_heads,
        d_head=d_inner // n_heads,
        parallel=parallel,
        head_sites=tuple(f"{_module_of(w)}:input" for w in head_weights),
        head_weights=head_weights,
        head_layout=layout,
        mlp_sites=tuple(f"blocks.{layer}.mlp.hook_out" for layer in range(n_layers)),
        attn_in_sites=tuple(f"{path(attn_norm, layer)}:input" for layer in range(n_layers)),
        mlp_in_sites=tuple(f"{path(mlp_norm, layer)}:input" for layer in range(n_layers)),
        final_site=f"{path(final_module, None)}:input",
    )


def default_cnn_sites(handle: ModelHandle) -> list[str]:
    """The model's direct children that have weights and output a feature map (ShapesNet: stem, layer1..3)."""
    model = handle.model
    candidates = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    if not candidates:
        raise WorkbenchError(f"{handle.spec}: no child module with weights; name the channel sites to use")
    with torch.no_grad():
        _, acts = run_with_cache(handle, dummy_input(handle), candidates)
    return [name for name in candidates if acts.get(name) is not None and acts[name].ndim == 4]


def cnn_graph(handle: ModelHandle, sites: list[str] | None = None) -> ComponentGraph:
    """Channel nodes at `sites` (default `default_cnn_sites`) of an image classifier."""
    sites = default_cnn_sites(handle) if sites is None else list(sites)
    if not sites:
        raise WorkbenchError(f"{handle.spec}: no block outputs a feature map (N, C, H, W); name the channel sites to use")
    with torch.no_grad():
        _, acts = run_with_cache(handle, dummy_input(handle), sites)
    widths = []
    for site in sites:
        act = acts.get(site)
        if act is None or act.ndim < 2:
            raise WorkbenchError(f"site {site!r} carries no (N, C, ...) activation; channel nodes need one")
        widths.append((site, int(act.shape[1])))
    nodes = tuple(f"{site}.c{c}" for site, width in widths for c in range(width))
    return ComponentGraph(kind="cnn", nodes=nodes, cnn_sites=tuple(widths))


def component_graph(handle: ModelHandle, *, cnn_sites: list[str] | None = None) -> ComponentGraph:
    """The graph of any model the loader handles: residual graph for causal LMs, channels for CNNs."""
    if handle.kind == "image_classifier":
        return cnn_graph(handle, cnn_sites)
    if handle.kind != "causal_lm":
        raise WorkbenchError(f"circuits work on causal language models and image classifiers; {handle.spec!r} is a "
                             f"{handle.kind} model")
    return transformer_graph(handle)


def head_out_weights(model: nn.Module, graph: ComponentGraph) -> list[torch.Tensor]:
    """Per layer, the output projection as (heads, d_head, d_model): head h writes z_h @ W[h]."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for name in graph.head_weights:
        w = as_out_in(params[name], graph.head_layout)  # type: ignore[arg-type]  # (d_model, heads * d_head)
        out.append(w.t().reshape(graph.n_heads, graph.d_head, w.shape[0]))
    return out
