"""Natural adversaries: adversarial filtering with scene explanations, and SNAFUE's natural-patch search."""

from __future__ import annotations

import pytest
import torch

from adversaries.natural import (
    SNAFUE,
    AdversarialFiltering,
    confusion_matrix,
    confusion_pairs,
    default_embedding_site,
    natural_patch_pool,
    over_represented,
)
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.worlds.shapesworld import Sample, ShapesWorld


def _sample(n: int, classes: int, seed: int = 0) -> Sample:
    s = ShapesWorld().sample(n, generator=torch.Generator().manual_seed(seed))
    return Sample(s.scene, s.labels % classes, s.colors, s.context, s.trojan, s.poison_labels % classes)


def test_confusion_pairs_rank_off_diagonal_rates() -> None:
    m = torch.tensor([[90, 10, 0], [1, 98, 1], [30, 0, 70]])
    pairs = confusion_pairs(m, k=2)
    assert [(s, t) for s, t, _ in pairs] == [(2, 0), (0, 1)]
    assert pairs[0][2] == pytest.approx(0.3)


def test_over_represented_finds_the_planted_feature() -> None:
    feats = [{"class": "a", "color": "red" if i % 4 == 0 else "blue", "texture": "plain", "context": [], "context_objects": [],
              "distractors": [], "size": "small", "offset": "near-centre"} for i in range(200)]
    failed = torch.tensor([i % 4 == 0 and i % 8 == 0 for i in range(200)])  # failures: half the red ones, no blue
    rows = over_represented(feats, failed, min_count=3)
    top = rows[0]
    assert top["feature"] in ("color=red", "class+color=a+red") and top["lift"] == pytest.approx(4.0)
    assert top["failure_rate_given"] == pytest.approx(0.5)


@pytest.mark.parametrize("fixture, classes", [("cnn_handle", 5), ("gray_cnn_handle", 4)])
def test_filtering_keeps_only_confident_failures(request: pytest.FixtureRequest, fixture: str, classes: int) -> None:
    h: ModelHandle = request.getfixturevalue(fixture)
    sample = _sample(96, classes)
    ae = AdversarialFiltering(confidence=0.0, max_keep=500).generate(h, sample, None)
    e = ae.extra
    assert e["n_confident_wrong"] == e["n_wrong"] == len(ae)
    assert torch.all(ae.adversarial_pred != ae.original_pred)
    assert len(e["examples"]) == len(ae) and all("params" in r and "description" in r for r in e["examples"])
    strict = AdversarialFiltering(confidence=0.9).generate(h, sample, None)
    assert len(strict) <= len(ae)
    assert all(r["confidence"] >= 0.9 for r in strict.extra["examples"])


def test_filtering_needs_labels_or_a_world(cnn_handle: ModelHandle) -> None:
    with pytest.raises(WorkbenchError, match="no ShapesWorld"):
        AdversarialFiltering(n_scenes=8).generate(cnn_handle, None, None)
    with pytest.raises(WorkbenchError, match="needs labels"):
        AdversarialFiltering().generate(cnn_handle, torch.rand(4, 3, 16, 16), None)
    with pytest.raises(WorkbenchError, match="classes 0..4"):
        AdversarialFiltering().generate(cnn_handle, _sample(16, 8), None)
    with pytest.raises(WorkbenchError, match="color_mode"):
        AdversarialFiltering(color_mode="rainbow")


def test_pool_excludes_the_target_shape(cnn_handle: ModelHandle) -> None:
    pool = natural_patch_pool(cnn_handle, side=8, n=40, seed=0, exclude_shape="star")
    assert pool.patches.shape == (40, 3, 8, 8)
    assert not any("star" in d for d, k in zip(pool.descriptions, pool.kinds) if k == "object")
    assert float(pool.patches.min()) >= 0 and float(pool.patches.max()) <= 1


def test_snafue_on_a_small_cnn(gray_cnn_handle: ModelHandle) -> None:
    h = gray_cnn_handle
    assert default_embedding_site(h) == "fc:input"
    x = -1 + 2 * torch.rand(10, 1, 20, 28, generator=torch.Generator().manual_seed(0))
    cfg = SNAFUE(pool_size=20, top_k=3, synthetic_steps=10, n_embed_images=4, eval_placements=1, patch_frac=0.4)
    ae = cfg.generate(h, x, 2)
    m = ae.extra["pairs"][0]
    sims = [r["similarity"] for r in m["top_patches"]]
    assert sims == sorted(sims, reverse=True)
    for key in ("baseline_fooling_rate", "synthetic_fooling_rate", "natural_fooling_rate_mean",
                "control_random_natural_fooling_rate", "fooling_rate_increase"):
        assert 0.0 - 1.0 <= m[key] <= 1.0
    assert ae.patch.shape == (1, m["patch_side_pixels"], m["patch_side_pixels"])
    assert float(ae.adversarial.min()) >= -1 - 1e-6 and float(ae.adversarial.max()) <= 1 + 1e-6
    again = cfg.generate(h, x, 2)
    assert again.extra["pairs"] == ae.extra["pairs"]


def test_confusion_matrix_counts(cnn_handle: ModelHandle) -> None:
    x = torch.rand(20, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(20) % 5
    m = confusion_matrix(cnn_handle, x, y)
    assert m.shape == (5, 5) and int(m.sum()) == 20 and m.sum(1).tolist() == [4] * 5


@pytest.mark.slow
def test_shapesnet_filtering_finds_the_spurious_colour_and_snafue_beats_controls() -> None:
    import workbench
    from adversaries.natural import snafue_fooling_rates

    h = workbench.load("zoo:shapesnet", device="cpu", progress=False)
    ae = AdversarialFiltering(n_scenes=1500, color_mode="uniform").generate(h, None, None)
    top = [r["feature"] for r in ae.extra["over_represented"][:8]]
    assert any("+red" in f or f == "color=red" for f in top)
    assert all(r["predicted"] != r["true"] for r in ae.extra["examples"])
    out = snafue_fooling_rates(h, source="circle", target="hexagon", n=32, seeds=(0,),
                               config=SNAFUE(pool_size=160, synthetic_steps=80, top_k=5))
    row = out["rows"][0]
    assert row["measured"] > row["control_random_natural"] and row["measured"] > row["baseline"]


def test_snafue_restarts_keep_the_first_search_and_return_the_measured_patches(gray_cnn_handle: ModelHandle) -> None:
    h = gray_cnn_handle
    x = -1 + 2 * torch.rand(10, 1, 20, 28, generator=torch.Generator().manual_seed(1))
    base = dict(pool_size=24, top_k=3, synthetic_steps=8, n_embed_images=4, eval_placements=1, patch_frac=0.4)
    one = SNAFUE(**base).generate(h, x, 1)
    two = SNAFUE(**base, n_synthetic=2).generate(h, x, 1)
    rows1, rows2 = one.extra["top_patches"], two.extra["top_patches"]
    assert [r["index"] for r in rows2[:3]] == [r["index"] for r in rows1]  # restart 0 is the single search
    assert 3 <= len(rows2) <= 6 and len({r["index"] for r in rows2}) == len(rows2)  # no patch twice
    assert [r["restart"] for r in rows2] == sorted(r["restart"] for r in rows2)
    imgs = two.extra["top_patch_images"]
    side = two.extra["patch_side_pixels"]
    assert imgs.shape == (len(rows2), 1, side, side)
    for r in rows2:
        assert abs(r["target_confidence_gain"] - (r["target_confidence"] - two.extra["baseline_target_confidence"])) < 1e-6
    assert "top_patch_images" not in two.summary()  # tensors stay out of the JSON summary
    with pytest.raises(WorkbenchError, match="n_synthetic"):
        SNAFUE(n_synthetic=0)
