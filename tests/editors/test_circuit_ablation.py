"""Circuit ablation as a weight edit: the folded delta equals a mean-ablation hook written here from scratch
(GPT-2, GPT-NeoX, Llama, a ResNet with BatchNorm), fitting leaves the model alone, revert is bit-exact,
another model's circuit and unfoldable nodes are refused, and on a planted head the circuit and its
complement do what the plant says."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from editors import available
from editors.circuit_ablation import (
    CircuitAblation,
    CircuitAblationRequest,
    circuit_graph,
    node_ranking,
    random_nodes,
    resolve_ablation,
    select_nodes,
)
from editors.folding import NotFoldableError
from tests.workbench.circuits.conftest import PAIRS, PLANTED_HEAD, PLANTED_LAYER, planted_gpt2  # noqa: F401 (fixture)
from workbench.circuits import Circuit, DiscoveryConfig, component_graph, find_circuit
from workbench.circuits.components import cnn_graph
from workbench.circuits.tasks import logits_of, pairs_task
from workbench.errors import FingerprintMismatchError, WorkbenchError
from workbench.fingerprint import model_fingerprint
from workbench.handle import ModelHandle
from workbench.hooks import patch, run_with_cache
from workbench.models import run_model

TEXTS = [p["clean"] for p in PAIRS] + [p["corrupted"] for p in PAIRS]
NODES = ("a0.h1", "m0", "a1.h3", "m1")


def _circuit(handle: ModelHandle, graph: Any, kept: set[str], *, level: str = "node") -> Circuit:
    comps = graph.components(level)
    scores = tuple(float(len(comps) - i) for i in range(len(comps)))
    return Circuit(model=handle.spec, fingerprint=model_fingerprint(handle.model), task="test", method="eap",
                   level=level, components=tuple(comps), scores=scores, kept=tuple(c in kept for c in comps))


def _encode(handle: ModelHandle, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = handle.tokenizer(texts, return_tensors="pt", padding=True)
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _lm_means(handle: ModelHandle, sites: list[str]) -> dict[str, torch.Tensor]:
    """Per site: the mean over texts of each text's mean over its tokens (one text per pass, no padding)."""
    sums: dict[str, torch.Tensor] = {}
    for text in TEXTS:
        _, acts = run_with_cache(handle, _encode(handle, [text]), sites)
        for s in sites:
            sums[s] = sums.get(s, 0) + acts[s][0].double().mean(0)
    return {s: (v / len(TEXTS)).float() for s, v in sums.items()}


def _lm_hook(handle: ModelHandle, nodes: tuple[str, ...]) -> Any:
    """Mean ablation at run time, written directly on the activations: head slices and MLP outputs."""
    g = component_graph(handle)
    heads: dict[int, list[int]] = {}
    mlps: list[int] = []
    for n in nodes:
        if n.startswith("a"):
            layer, head = n[1:].split(".h")
            heads.setdefault(int(layer), []).append(int(head))
        else:
            mlps.append(int(n[1:]))
    sites = [g.head_sites[layer] for layer in heads] + [g.mlp_sites[layer] for layer in mlps]
    means = _lm_means(handle, sites)
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for layer, hs in heads.items():
        site = g.head_sites[layer]

        def head_fn(act: torch.Tensor, key: str = site, hs: list[int] = hs) -> torch.Tensor:
            out = act.clone()
            for h in hs:
                sl = slice(h * g.d_head, (h + 1) * g.d_head)
                out[..., sl] = means[key][sl]
            return out

        fns[site] = head_fn
    for layer in mlps:
        site = g.mlp_sites[layer]
        fns[site] = lambda act, key=site: means[key].expand_as(act).clone()
    return patch(handle, fns)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_folded_mean_ablation_equals_the_run_time_hook(load_tiny: Callable[[str], ModelHandle], family: str) -> None:
    h = load_tiny(family)
    circuit = _circuit(h, component_graph(h), set())
    before = model_fingerprint(h.model)
    delta = CircuitAblation(value="mean").fit(h, CircuitAblationRequest(circuit, nodes=NODES, reference=TEXTS))
    assert model_fingerprint(h.model) == before  # fitting leaves the model unchanged
    assert delta.method == "circuit-ablate" and delta.extra["nodes"] == ["a0.h1", "m0", "a1.h3", "m1"]
    x = _encode(h, ["the quick brown fox jumps over the lazy dog", "the capital of rome is"])
    with torch.no_grad():
        clean = logits_of(run_model(h.model, x))
        with _lm_hook(h, NODES):
            want = logits_of(run_model(h.model, x))
        with delta.applied(h.model):
            got = logits_of(run_model(h.model, x))
    assert float((want - clean).abs().max()) > 1e-3  # the ablation does something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert model_fingerprint(h.model) == before  # revert is bit-exact


def test_llama_zero_folds_and_mean_is_refused(load_tiny: Callable[[str], ModelHandle]) -> None:
    h = load_tiny("llama")
    circuit = _circuit(h, component_graph(h), set())
    with pytest.raises(NotFoldableError, match="no bias.*ablation_hook"):
        CircuitAblation(value="mean").fit(h, CircuitAblationRequest(circuit, nodes=("a1.h3",), reference=TEXTS))
    before = model_fingerprint(h.model)
    delta = CircuitAblation(value="zero").fit(h, CircuitAblationRequest(circuit, nodes=("a0.h1", "a1.h3", "m1")))
    g = component_graph(h)

    def zero_heads(act: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
        out = act.clone()
        for hd in heads:
            out[..., hd * g.d_head:(hd + 1) * g.d_head] = 0
        return out

    x = _encode(h, ["the capital of rome is", "a dog is in the red city"])
    with torch.no_grad():
        with patch(h, {g.head_sites[0]: lambda a: zero_heads(a, (1,)), g.head_sites[1]: lambda a: zero_heads(a, (3,)),
                       g.mlp_sites[1]: lambda a: torch.zeros_like(a)}):
            want = logits_of(run_model(h.model, x))
        with delta.applied(h.model):
            got = logits_of(run_model(h.model, x))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert model_fingerprint(h.model) == before


def _cnn_hook(handle: ModelHandle, channels: dict[str, list[int]], images: torch.Tensor) -> Any:
    _, acts = run_with_cache(handle, images, list(channels))
    means = {s: acts[s].double().mean((0, 2, 3)).float() for s in channels}

    def fn(site: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def set_mean(act: torch.Tensor) -> torch.Tensor:
            out = act.clone()
            for c in channels[site]:
                out[:, c] = means[site][c]
            return out
        return set_mean

    return patch(handle, {s: fn(s) for s in channels})


@pytest.mark.parametrize("sites, nodes", [
    (None, ("stem.c1", "layer2.c3", "layer2.c5", "layer3.c0")),  # block outputs: projection shortcuts edited too
    (["stem.relu", "layer1.relu1", "layer2.relu1", "layer3.relu2"], ("layer1.relu1.c2", "layer2.relu1.c0", "layer3.relu2.c7")),
])
def test_cnn_channels_fold_into_batchnorm_exactly(resnet_handle: ModelHandle, sites: list[str] | None,
                                                  nodes: tuple[str, ...]) -> None:
    h = resnet_handle
    g = cnn_graph(h, sites)
    circuit = _circuit(h, g, set(nodes))
    reference = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    before = model_fingerprint(h.model)
    delta = CircuitAblation().fit(h, CircuitAblationRequest(circuit, reference=reference))
    assert delta.extra["nodes"] == list(nodes)
    assert any(".bn" in p or "shortcut.1" in p for p in delta.extra["params"])
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    channels: dict[str, list[int]] = {}
    for n in nodes:
        site, c = n.rsplit(".c", 1)
        channels.setdefault(site, []).append(int(c))
    with torch.no_grad():
        clean = h.model(x)
        with _cnn_hook(h, channels, reference):
            want = h.model(x)
        with delta.applied(h.model):
            got = h.model(x)
    assert float((want - clean).abs().max()) > 1e-4
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert model_fingerprint(h.model) == before


def test_identity_shortcut_channel_mean_is_refused_and_zero_folds(resnet_handle: ModelHandle) -> None:
    h = resnet_handle
    circuit = _circuit(h, cnn_graph(h), {"layer1.c2"})
    reference = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with pytest.raises(NotFoldableError, match="layer1.c2.*ablation_hook"):
        CircuitAblation(value="mean").fit(h, CircuitAblationRequest(circuit, reference=reference))
    delta = CircuitAblation(value="zero").fit(h, CircuitAblationRequest(circuit))
    assert any(p.startswith("layer2.") for p in delta.extra["params"])  # read side: the next block's convolutions
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with patch(h, {"layer1": lambda a: torch.cat([a[:, :2], torch.zeros_like(a[:, 2:3]), a[:, 3:]], 1)}):
            want = h.model(x)
        with delta.applied(h.model):
            got = h.model(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_patch_ablation_to_a_fixed_activation(load_tiny: Callable[[str], ModelHandle]) -> None:
    h = load_tiny("gpt2")
    g = component_graph(h)
    circuit = _circuit(h, g, set())
    value = torch.linspace(-1, 1, g.d_head)
    delta = CircuitAblation(value="zero").fit(h, CircuitAblationRequest(circuit, nodes=("a1.h2",), values={"a1.h2": value}))
    x = _encode(h, ["the capital of rome is"])
    sl = slice(2 * g.d_head, 3 * g.d_head)

    def fixed(act: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        out[..., sl] = value
        return out

    with torch.no_grad():
        with patch(h, {g.head_sites[1]: fixed}):
            want = logits_of(run_model(h.model, x))
        with delta.applied(h.model):
            got = logits_of(run_model(h.model, x))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(WorkbenchError, match="needs 8"):
        CircuitAblation().fit(h, CircuitAblationRequest(circuit, nodes=("a1.h2",), values={"a1.h2": torch.ones(3)}))


def test_another_models_circuit_is_refused(load_tiny: Callable[[str], ModelHandle]) -> None:
    h = load_tiny("gpt2")
    circuit = _circuit(h, component_graph(h), {"a0.h1"})
    with torch.no_grad():
        h.model.transformer.h[0].attn.c_attn.bias.add_(1e-3)
    before = model_fingerprint(h.model)
    with pytest.raises(FingerprintMismatchError, match="find the circuit again on this model"):
        CircuitAblation().fit(h, CircuitAblationRequest(circuit, reference=TEXTS))
    assert model_fingerprint(h.model) == before


def test_selection_errors_and_edge_circuits(load_tiny: Callable[[str], ModelHandle]) -> None:
    h = load_tiny("gpt2")
    g = component_graph(h)
    node_circuit = _circuit(h, g, set())
    with pytest.raises(WorkbenchError, match="unknown node 'a9.h0'"):
        select_nodes(node_circuit, g, nodes=["a9.h0"])
    with pytest.raises(NotFoldableError, match="residual stream"):
        select_nodes(node_circuit, g, nodes=["input"])
    with pytest.raises(WorkbenchError, match="selection is empty"):
        select_nodes(node_circuit, g)  # nothing kept
    with pytest.raises(WorkbenchError, match="top 0"):
        select_nodes(node_circuit, g, top=0)
    with pytest.raises(WorkbenchError, match="needs reference inputs"):
        CircuitAblation().fit(h, CircuitAblationRequest(node_circuit, nodes=("m0",)))
    assert select_nodes(node_circuit, g, top=2) == ["a0.h0", "a0.h1"]  # scores fall along the graph; input skipped
    everything = [n for n in g.nodes if n != "input"]
    assert select_nodes(node_circuit, g, nodes=["m1", "a0.h2"], complement=True) == [n for n in everything
                                                                                    if n not in ("m1", "a0.h2")]
    # an edge circuit is ablated through the senders of its kept edges (an edge alone does not fold)
    edge_circuit = _circuit(h, g, {"input->a1", "a0.h2->m0", "a0.h2->logits", "m0->a1"}, level="edge")
    assert select_nodes(edge_circuit, g) == ["a0.h2", "m0"]
    ablation = resolve_ablation(h, CircuitAblationRequest(edge_circuit), "zero", g)
    assert len(ablation.pairs) == g.d_head + 32
    control = random_nodes(g, 2, exclude=["a0.h2", "m0"], seed=0, like=["a0.h2", "m0"])
    assert len(control) == 2 and sum(n.startswith("m") for n in control) == 1 and not {"a0.h2", "m0"} & set(control)
    assert random_nodes(g, 2, exclude=["a0.h2", "m0"], seed=0, like=["a0.h2", "m0"]) == control
    assert "circuit-ablate" in available()


def test_planted_head_circuit_and_complement(planted_gpt2: ModelHandle) -> None:  # noqa: F811
    """Only a1.h2 carries the subject to the last token: ablating it removes the behaviour exactly; ablating
    every other head changes nothing; ablating everything else (MLPs too) keeps much of it."""
    h = planted_gpt2
    task = pairs_task(h, PAIRS, name="pairs")
    circuit = find_circuit(h, task, DiscoveryConfig(method="eap", level="node", random_draws=1))
    assert node_ranking(circuit)[0] == f"a{PLANTED_LAYER}.h{PLANTED_HEAD}"  # the best node after the embeddings
    g = circuit_graph(h, circuit)

    def behaviour(delta: Any = None) -> float:
        with torch.no_grad():
            if delta is None:
                return float(task.metric(logits_of(run_model(h.model, task.clean))) -
                             task.metric(logits_of(run_model(h.model, task.corrupted))))
            with delta.applied(h.model):
                return behaviour()

    full = behaviour()
    other_heads = tuple(n for n in g.nodes if n.startswith("a") and n != f"a{PLANTED_LAYER}.h{PLANTED_HEAD}")
    fit = CircuitAblation().fit
    cut = fit(h, CircuitAblationRequest(circuit, top=1, reference=TEXTS))
    heads_off = fit(h, CircuitAblationRequest(circuit, nodes=other_heads, reference=TEXTS))
    rest_off = fit(h, CircuitAblationRequest(circuit, top=1, complement=True, reference=TEXTS))
    assert abs(full) > 1e-3
    assert behaviour(cut) == pytest.approx(0.0, abs=1e-5)
    assert behaviour(heads_off) == pytest.approx(full, rel=1e-5)
    assert 0.5 * abs(full) < abs(behaviour(rest_off)) < abs(full)
    assert rest_off.extra["nodes"] == [n for n in g.nodes if n not in ("input", f"a{PLANTED_LAYER}.h{PLANTED_HEAD}")]
