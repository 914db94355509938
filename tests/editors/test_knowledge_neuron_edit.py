"""Knowledge-neuron edits as weight deltas: exact equivalence with activation edits, fitting
leaves the model alone, revert is exact, attributed neurons beat random ones on FactGPT (slow)."""

from __future__ import annotations

import pytest
import torch

from editors.finetune import target_probabilities
from editors.knowledge_neuron_edit import KnowledgeNeuronEdit, mlp_width, neuron_delta, random_neurons
from editors.registry import get
from tests.zoo_models import factgpt
from workbench.errors import WorkbenchError
from workbench.fingerprint import model_fingerprint
from workbench.handle import ModelHandle
from workbench.hooks import capture, edit
from workbench.knowledge_neurons import attribute_neurons
from workbench.requests import Rewrite
from workbench.sites import as_out_in

CAUSAL = ("gpt2", "gpt_neox", "llama")
REWRITE = Rewrite(prompt="the capital of {} is", subject="vel oran", target_new="paris", target_true="rome",
                  paraphrase_prompts=("north vel oran capital city is", "the city of vel oran is"))
OTHER = Rewrite(prompt="{} is spoken in", subject="tal mira", target_new="berlin", target_true="quenn")
IDS = torch.tensor([[7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25]])
NEURONS = [(0, 3), (1, 10), (1, 17)]


def _logits(h: ModelHandle) -> torch.Tensor:
    with torch.no_grad():
        return h.model(input_ids=IDS).logits


def _zero_neurons(neurons, scale: float = 0.0):
    """Activation edits that scale the given neurons at blocks.L.mlp.hook_post."""
    by_layer: dict[int, list[int]] = {}
    for layer, idx in neurons:
        by_layer.setdefault(layer, []).append(idx)

    def make(idx: list[int]):
        def fn(act: torch.Tensor) -> None:
            act[..., idx] *= scale

        return fn

    return {f"blocks.{layer}.mlp.hook_post": make(idx) for layer, idx in by_layer.items()}


def test_registered() -> None:
    assert get("kn") is KnowledgeNeuronEdit


@pytest.mark.parametrize("family", CAUSAL)
def test_suppress_equals_zeroing_the_activations(load_tiny, family: str) -> None:
    h = load_tiny(family)
    delta = neuron_delta(h, NEURONS, mode="suppress")
    assert delta.extra["neurons"] == [list(n) for n in NEURONS]
    with edit(h, _zero_neurons(NEURONS)):
        zeroed = _logits(h)
    with delta.applied(h.model):
        edited = _logits(h)
    assert not torch.allclose(edited, _logits(h), atol=1e-6)  # it does something
    torch.testing.assert_close(edited, zeroed, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", CAUSAL)
def test_suppress_removes_exactly_the_neurons_contribution(load_tiny, family: str) -> None:
    h = load_tiny(family)
    layer, idx = 1, [4, 9, 30]
    sites = [f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.mlp.hook_out"]
    with torch.no_grad(), capture(h, sites) as clean:
        h.model(input_ids=IDS)
    delta = neuron_delta(h, [(layer, i) for i in idx], mode="suppress")
    with torch.no_grad(), delta.applied(h.model), capture(h, sites) as after:
        h.model(input_ids=IDS)
    weight, layout = h.arch.site_map.weight(h.model, "mlp_out", layer)
    values = as_out_in(weight, layout)[:, idx].detach()  # (d_model, k)
    contribution = clean[sites[0]][..., idx] @ values.T  # (batch, seq, d_model)
    torch.testing.assert_close(after[sites[1]] - clean[sites[1]], -contribution, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", CAUSAL)
def test_amplify(load_tiny, family: str) -> None:
    h = load_tiny(family)
    base = _logits(h)
    with neuron_delta(h, NEURONS, mode="amplify", factor=1.0).applied(h.model):
        assert torch.equal(_logits(h), base)  # factor 1 is a no-op
    with edit(h, _zero_neurons(NEURONS, scale=3.0)):
        scaled = _logits(h)
    with neuron_delta(h, NEURONS, mode="amplify", factor=3.0).applied(h.model):
        torch.testing.assert_close(_logits(h), scaled, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", CAUSAL)
def test_replace_writes_the_embedding_difference(load_tiny, family: str) -> None:
    h = load_tiny(family)
    delta = neuron_delta(h, NEURONS, mode="replace", strength=2.0, target_new="paris", target_true="rome")
    emb = h.model.get_output_embeddings().weight.detach()
    new, true = h.tokenizer.convert_tokens_to_ids(["paris", "rome"])
    want = 2.0 * (emb[new] - emb[true])
    for layer in (0, 1):
        name = h.arch.site_map.weight_name(h.model, "mlp_out", layer)
        _, layout = h.arch.site_map.weight(h.model, "mlp_out", layer)
        change = as_out_in(delta.dense(name), layout)
        touched = [i for lay, i in NEURONS if lay == layer]
        for i in touched:
            torch.testing.assert_close(change[:, i], want)
        others = [i for i in range(change.shape[1]) if i not in touched]
        assert torch.count_nonzero(change[:, others]) == 0


@pytest.mark.parametrize("family", CAUSAL)
def test_fit_leaves_model_unchanged_reverts_and_records_neurons(load_tiny, family: str) -> None:
    h = load_tiny(family)
    before = model_fingerprint(h.model)
    base = _logits(h)
    delta = KnowledgeNeuronEdit(steps=5).fit(h, REWRITE)
    assert model_fingerprint(h.model) == before
    assert all(p.grad is None for p in h.model.parameters())
    # The selection is the attribution's refined list (top max_neurons), recorded in the delta.
    attribution = attribute_neurons(h, [REWRITE.text, *REWRITE.paraphrase_prompts], "rome", steps=5)
    want = [[n.layer, n.neuron] for n in attribution.top(5)] or [[n.layer, n.neuron] for n in attribution.ranked(1)]
    assert delta.extra["selections"][0]["neurons"] == want
    assert sorted(delta.extra["neurons"]) == sorted(want)
    assert delta.request["target_new"] == "paris"
    with edit(h, _zero_neurons([tuple(n) for n in want])):
        zeroed = _logits(h)
    with delta.applied(h.model):
        torch.testing.assert_close(_logits(h), zeroed, atol=1e-5, rtol=0)
    assert torch.equal(_logits(h), base)
    assert model_fingerprint(h.model) == before


def test_batch_fit_unions_the_neurons(load_tiny) -> None:
    h = load_tiny("gpt2")
    config = KnowledgeNeuronEdit(steps=5, max_neurons=2)
    both = config.fit(h, [REWRITE, OTHER])
    singles = [config.fit(h, rw).extra["neurons"] for rw in (REWRITE, OTHER)]
    assert sorted(tuple(n) for n in both.extra["neurons"]) == sorted({tuple(n) for s in singles for n in s})
    replace = KnowledgeNeuronEdit(steps=5, max_neurons=2, mode="replace").fit(h, [REWRITE, OTHER])
    assert len(replace.request) == 2


def test_random_neurons_are_seeded_and_respect_exclude(load_tiny) -> None:
    h = load_tiny("llama")
    a = random_neurons(h, 10, seed=3)
    assert a == random_neurons(h, 10, seed=3)
    assert a != random_neurons(h, 10, seed=4)
    assert len(set(a)) == 10
    b = random_neurons(h, 5, seed=3, layers=[1], exclude=a)
    assert all(layer == 1 for layer, _ in b) and not set(b) & set(a)
    assert mlp_width(h, 0) == 64


def test_bad_neurons_and_modes_are_clear_errors(load_tiny) -> None:
    h = load_tiny("gpt2")
    with pytest.raises(WorkbenchError, match="layers 0..1"):
        neuron_delta(h, [(2, 0)])
    with pytest.raises(WorkbenchError, match="neurons 0..127"):
        neuron_delta(h, [(0, 128)])
    with pytest.raises(WorkbenchError, match="no neurons"):
        neuron_delta(h, [])
    with pytest.raises(WorkbenchError, match="target_new and target_true"):
        neuron_delta(h, [(0, 1)], mode="replace")
    with pytest.raises(WorkbenchError, match="mode"):
        KnowledgeNeuronEdit(mode="erase")  # type: ignore[arg-type]
    with pytest.raises(WorkbenchError, match="target_true"):
        KnowledgeNeuronEdit(mode="replace").fit(h, OTHER.__class__(prompt="{} is", subject="tal mira", target_new="rome"))
    with pytest.raises(WorkbenchError, match="only 128"):
        random_neurons(h, 129, seed=0, layers=[0])
    with pytest.raises(WorkbenchError, match="causal"):
        neuron_delta(load_tiny("bert"), [(0, 1)])


# ---- FactGPT (slow): attributed neurons vs the same number of random neurons ------------

def _factgpt() -> ModelHandle:
    return factgpt()


def suppression_vs_random(h: ModelHandle, n_facts: int = 10, *, seed: int = 0, n_controls: int = 3,
                          config: KnowledgeNeuronEdit | None = None) -> dict[str, float]:
    """Mean relative drop of P(true answer) over each fact's prompt and paraphrases when
    suppressing its knowledge neurons, vs the same number of random neurons in the same layers."""
    config = KnowledgeNeuronEdit() if config is None else config
    world = h.info["world"]
    rewrites = [Rewrite.from_counterfact(r) for r in world.counterfact_records(n_facts, seed=seed)]
    drops, controls, n_neurons = [], [], []
    for c, rw in enumerate(rewrites):
        prompts = [rw.text, *rw.paraphrase_prompts]
        targets = [rw.target_true] * len(prompts)
        p0 = target_probabilities(h, prompts, targets)
        delta = config.fit(h, rw)
        neurons = [tuple(n) for n in delta.extra["neurons"]]
        n_neurons.append(len(neurons))
        with delta.applied(h.model):
            drops.append(float((1 - target_probabilities(h, prompts, targets) / p0).mean()))
        layers = sorted({layer for layer, _ in neurons})
        for k in range(n_controls):
            rand = random_neurons(h, len(neurons), seed=1000 * c + k, layers=layers, exclude=neurons)
            with neuron_delta(h, rand).applied(h.model):
                controls.append(float((1 - target_probabilities(h, prompts, targets) / p0).mean()))
    return {"kn_drop": sum(drops) / len(drops), "random_drop": sum(controls) / len(controls),
            "mean_neurons": sum(n_neurons) / len(n_neurons), "n_facts": len(rewrites)}


@pytest.mark.slow
def test_factgpt_suppression_beats_random_neurons() -> None:
    h = _factgpt()
    result = suppression_vs_random(h, 10)
    assert result["kn_drop"] > result["random_drop"], result
