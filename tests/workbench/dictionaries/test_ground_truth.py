"""Latents judged against a world's ground truth: the AUROC arithmetic, and on ShapesNet a small SAE whose best
latent, difference-in-means and a probe are scored on the same held-out examples."""

from __future__ import annotations

import itertools

import pytest
import torch

from workbench.dictionaries.ground_truth import auroc, auroc_columns, ground_truth_table, weighted_auroc, world_examples
from workbench.dictionaries.train import TrainConfig, train_dictionary


def _pairs_auroc(scores: list[float], labels: list[bool]) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_is_the_share_of_ordered_pairs_with_ties_half() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40,), generator=g).float()  # many ties
    labels = torch.rand(40, generator=g) < 0.4
    expected = _pairs_auroc(scores.tolist(), labels.tolist())
    assert auroc(scores, labels) == pytest.approx(expected, abs=1e-12)
    cols = auroc_columns(torch.stack([scores, -scores], 1), labels[:, None])
    assert cols[0, 0].item() == pytest.approx(expected, abs=1e-12) and cols[0, 1].item() == pytest.approx(1 - expected)
    counts = torch.bincount(torch.randint(40, (40,), generator=g), minlength=40)  # one bootstrap resample
    repeated = torch.repeat_interleave(torch.arange(40), counts)
    resampled = _pairs_auroc(scores[repeated].tolist(), labels[repeated].tolist())
    assert weighted_auroc(scores, labels, counts[None].float())[0].item() == pytest.approx(resampled, abs=1e-12)


@pytest.mark.slow
def test_shapesnet_latents_are_scored_beside_diffmean_and_a_probe() -> None:
    import workbench as wb

    h = wb.load("zoo:shapesnet", device="cpu", progress=False)
    trained = train_dictionary(h, "layer2", TrainConfig(kind="topk", width=128, k=8, n_activations=131_072),
                               progress=False, eval_activations=8192)
    examples = world_examples(h, n_clean=400, n_per_trojan=60, seed=3)
    table = ground_truth_table(h, trained.dictionary, examples, n_bootstrap=100, seed=3, progress=False)
    names = [r.feature for r in table.results]
    assert {f"trojan:{t}" for t in ("patch-universal", "style-universal", "natural-universal")} <= set(names)
    assert any(n.startswith("shape:") for n in names) and any(n.startswith("color:") for n in names)
    for r in table.results:
        assert set(r.scores) == {"latent", "diffmean", "probe"} and 0 <= r.best_latent < 128
        for s in r.scores.values():
            assert s.auroc_ci[0] <= s.auroc <= s.auroc_ci[1]
    # a universal patch is the most visible thing in the world: some latent and the probe both find it
    patch = table.result("trojan:patch-universal")
    assert patch.scores["latent"].auroc > 0.95 and patch.scores["probe"].auroc > 0.95
    js = table.to_json()["features"][0]
    for key in ("feature", "best_latent", "auroc", "diffmean_auroc", "probe_auroc"):
        assert key in js
