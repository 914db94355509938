"""Rule rewriting: the constrained low-rank update maps exemplar keys toward their values and nothing else."""

from __future__ import annotations

import pytest
import torch

from editors.rule_rewrite import RewritePairs, RuleRewrite, _keys_values, _layer, key_second_moment, rewrite_delta
from workbench.errors import WorkbenchError
from workbench.fingerprint import model_fingerprint


def _pairs(seed: int = 0) -> RewritePairs:
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(24, 3, 16, 16, generator=g)
    keys = values.clone()
    keys[:, 0] = (keys[:, 0] + 0.4).clamp(max=1.0)  # the "concept": more red
    stats = torch.rand(48, 3, 16, 16, generator=g)
    return RewritePairs(keys=keys, values=values, stat_images=stats)


@pytest.mark.parametrize("layer,rank", [("features.3", 1), ("features.3", 3), ("head", 2)])
def test_rewrite_reduces_exemplar_residual_with_bounded_rank(cnn_handle, layer: str, rank: int) -> None:
    pairs = _pairs()
    before = model_fingerprint(cnn_handle.model)
    delta = RuleRewrite(layer=layer, rank=rank).fit(cnn_handle, pairs)
    assert model_fingerprint(cnn_handle.model) == before
    change = delta.dense(f"{layer}.weight")
    assert int(torch.linalg.matrix_rank(change.reshape(change.shape[0], -1).double(), atol=1e-6)) <= rank
    assert delta.extra["residual_after"] < delta.extra["residual_before"]
    module = _layer(cnn_handle, layer)
    with delta.applied(cnn_handle.model):
        k, _ = _keys_values(cnn_handle, layer, module, pairs.keys)
        assert model_fingerprint(cnn_handle.model) != before
    assert model_fingerprint(cnn_handle.model) == before  # bit-exact revert
    # Keys outside the update's directions are untouched: dW k = 0 for k orthogonal to D (rows of dW span D).
    flat = change.reshape(change.shape[0], -1).double()
    _, _, vh = torch.linalg.svd(flat)
    null = vh[rank:].T  # directions dW ignores
    assert torch.allclose(flat @ null, torch.zeros(flat.shape[0], null.shape[1], dtype=torch.float64), atol=1e-5)


def test_directions_and_statistics(cnn_handle) -> None:
    pairs = _pairs(1)
    c = key_second_moment(cnn_handle, "features.3", pairs.stat_images)
    assert c.shape == (8 * 9, 8 * 9) and torch.allclose(c, c.T)
    a = rewrite_delta(cnn_handle, "features.3", pairs, rank=2, directions="difference")
    b = rewrite_delta(cnn_handle, "features.3", pairs, rank=2, directions="keys")
    assert not torch.allclose(a.dense("features.3.weight"), b.dense("features.3.weight"))


def test_bad_input(cnn_handle) -> None:
    pairs = _pairs()
    with pytest.raises(WorkbenchError, match="rewritable layers"):
        RuleRewrite(layer="nope").fit(cnn_handle, pairs)
    with pytest.raises(WorkbenchError, match="Conv2d or Linear"):
        RuleRewrite(layer="features.1").fit(cnn_handle, pairs)
    with pytest.raises(WorkbenchError, match="same shape"):
        RuleRewrite(layer="head").fit(cnn_handle, RewritePairs(keys=pairs.keys[:3], values=pairs.values[:4]))
    with pytest.raises(WorkbenchError, match="rank"):
        RuleRewrite(layer="head", rank=0).fit(cnn_handle, pairs)


@pytest.mark.slow
def test_shapesnet_colour_rule_rewrite() -> None:
    import workbench as wb
    from editors.rule_rewrite import colour_pairs
    from workbench.zoo.shapesnet import clean_accuracy, world_of

    torch.set_num_threads(1)
    h = wb.load("zoo:shapesnet", device="cpu", progress=False)
    world = world_of(h)
    delta = RuleRewrite().fit(h, colour_pairs(world, 800, seed=0, mask=None))

    def acc(mode: str, seed: int) -> float:
        return clean_accuracy(h.model, world, n=1000, generator=torch.Generator().manual_seed(seed), color_mode=mode)

    clean0, dis0 = acc("natural", 11), acc("disagree", 12)
    with delta.applied(h.model):
        clean1, dis1 = acc("natural", 11), acc("disagree", 12)
    assert dis1 - dis0 >= 0.2 and clean0 - clean1 <= 0.01
