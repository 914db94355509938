"""Study 4's control: random neurons matched to the attributed ones on activation, seeded."""

from __future__ import annotations

import torch

from case_studies.knowledge_neurons import last_position_activations, random_like


def test_matched_random_neurons_are_as_active_as_the_chosen_ones(load_tiny) -> None:
    h = load_tiny("gpt2")
    acts = last_position_activations(h, ["the capital of vel oran is", "one two the capital of vel oran is"])
    assert acts.shape == (h.arch.n_layers, h.arch.d_mlp or acts.shape[1])
    width = acts.shape[1]
    ranks = [torch.argsort(torch.argsort(acts[layer], stable=True)) for layer in range(acts.shape[0])]
    chosen = [(0, int(acts[0].argmax())), (1, int(acts[1].argmin())), (1, int(acts[1].argsort()[width // 2]))]
    picked = random_like(h, chosen, seed=3, activations=acts, band=0.05)
    assert picked == random_like(h, chosen, seed=3, activations=acts, band=0.05)  # seeded
    assert len(picked) == len(chosen) and not set(picked) & set(chosen) and len(set(picked)) == len(picked)
    half = max(1, round(0.05 * width))
    for (layer, n), (rl, rn) in zip(chosen, picked):
        assert rl == layer
        assert abs(int(ranks[layer][rn]) - int(ranks[layer][n])) <= half  # matched on activation
    uniform = random_like(h, chosen, seed=3)  # without activations: uniform in the layer, same counts per layer
    assert sorted(layer for layer, _ in uniform) == sorted(layer for layer, _ in chosen)
