"""Unit selection: each method measures what it claims (properties, not printouts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.handle import Architecture, ImagePreprocess, ModelHandle
from workbench.unit_selection import (
    METHODS,
    UnitRanking,
    dissection_iou,
    random_units,
    select_units,
    shapley_values,
    target_logprob_metric,
    unit_activations,
)


class ChannelNet(nn.Module):
    """1x1 conv copying the RGB channels into units 0..2 (unit 3 = 0), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            for c in range(3):
                self.conv.weight[c, c] = 1.0
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.5, 1.0]]))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


@pytest.fixture
def channel_handle() -> ModelHandle:
    pre = ImagePreprocess(height=8, width=8, class_names=("r", "g", "b"))
    return ModelHandle(spec="test:channel", model=ChannelNet().eval(), kind="image_classifier",
                       arch=Architecture(family="cnn", n_layers=1), preprocess=pre)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_activation_difference_finds_the_boosted_channel(channel_handle: ModelHandle) -> None:
    neg = _images(32, 0)
    pos = neg.clone()
    pos[:, 1] = (pos[:, 1] + 0.5).clamp(max=1.0)  # green boosted
    r = select_units(channel_handle, "relu", method="activation_difference", positive=pos, negative=neg)
    assert r.units[0] == 1 and r.n_units == 4
    assert r.scores == sorted(r.scores, reverse=True)
    raw = select_units(channel_handle, "relu", method="activation_difference", positive=pos, negative=neg, normalize=False)
    manual = unit_activations(channel_handle, "relu", pos).mean(0) - unit_activations(channel_handle, "relu", neg).mean(0)
    assert raw.score_of(1) == pytest.approx(float(manual[1]), rel=1e-5)


def test_dissection_iou_is_one_for_the_unit_that_is_the_concept(channel_handle: ModelHandle) -> None:
    x = torch.zeros(16, 3, 8, 8)
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(16, 8, 8, generator=g) > 0.7
    x[:, 0] = masks.float()  # red exactly where the concept is
    x[:, 1] = torch.rand(16, 8, 8, generator=g) * 0.5
    iou, _ = dissection_iou(channel_handle, "relu", x, masks, quantile=0.5)
    assert float(iou[0]) > 0.95 and float(iou[1]) < 0.6
    r = select_units(channel_handle, "relu", method="dissection", images=x, masks={"spot": masks}, concept="spot", quantile=0.5)
    assert r.units[0] == 0
    with pytest.raises(WorkbenchError, match="concepts"):
        select_units(channel_handle, "relu", method="dissection", images=x, masks={"spot": masks}, concept="nope")


@pytest.mark.parametrize("attribution", ["conductance", "integrated_gradients"])
def test_attribution_is_complete_for_a_linear_path(channel_handle: ModelHandle, attribution: str) -> None:
    x = _images(8, 2)
    base = torch.zeros_like(x)
    r = select_units(channel_handle, "relu", method="attribution", inputs=x, target=0, baselines=base, steps=32,
                     attribution=attribution)
    with torch.no_grad():
        gap = float((channel_handle.model(x)[:, 0] - channel_handle.model(base)[:, 0]).mean())
    assert sum(r.all_scores) == pytest.approx(gap, rel=2e-2)  # completeness: attributions sum to the logit change
    assert r.units[0] == 0


def test_shapley_is_efficient_and_seeded(channel_handle: ModelHandle) -> None:
    x = _images(16, 3)
    metric = target_logprob_metric(channel_handle, x, 0)
    vals, info = shapley_values(channel_handle, "relu", metric, candidates=[0, 1, 2, 3], n_samples=6, truncation=0.0,
                                seed=5, progress=False)
    assert float(vals.sum()) == pytest.approx(info["v_full"] - info["v_all_removed"], abs=1e-5)
    again, _ = shapley_values(channel_handle, "relu", metric, candidates=[0, 1, 2, 3], n_samples=6, truncation=0.0,
                              seed=5, progress=False)
    assert torch.equal(vals, again)
    r = select_units(channel_handle, "relu", method="shapley", inputs=x, target=0, n_samples=6, progress=False)
    assert r.units[0] == 0 and abs(r.score_of(3)) < 1e-6  # unit 3 is always zero: no contribution


def test_ranking_json_and_plot(channel_handle: ModelHandle, tmp_path) -> None:
    x = _images(8, 4)
    r = select_units(channel_handle, "relu", method="activation_difference", positive=x, negative=x * 0.5)
    assert isinstance(r, UnitRanking) and r.top(2) == r.units[:2]
    js = r.to_json()
    assert js["site"] == "relu" and len(js["units"]) == 4
    path = r.plot(tmp_path / "ev.png", k=3)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_text_units_on_a_tiny_lm(load_tiny) -> None:
    h = load_tiny("gpt2")
    pos = ["the cat is red", "a red fox jumps"]
    neg = ["the dog is blue", "a blue fox jumps"]
    r = select_units(h, "blocks.0.mlp.hook_post", method="activation_difference", positive=pos, negative=neg, position="last")
    assert r.n_units == 128 and len(r.units) == 128
    a = select_units(h, "blocks.1.mlp.hook_post", method="attribution", inputs=pos, target=5, steps=4)
    assert a.n_units == 128


def test_bad_input(channel_handle: ModelHandle) -> None:
    x = _images(4, 0)
    with pytest.raises(WorkbenchError, match="unknown unit-selection method"):
        select_units(channel_handle, "relu", method="magic")  # type: ignore[arg-type]
    with pytest.raises(WorkbenchError, match="positive"):
        select_units(channel_handle, "relu", method="activation_difference", positive=x)
    with pytest.raises(WorkbenchError, match="out of range"):
        select_units(channel_handle, "relu", method="attribution", inputs=x, target=7)
    with pytest.raises(WorkbenchError, match="empty"):
        select_units(channel_handle, "relu", method="activation_difference", positive=x[:0], negative=x)
    with pytest.raises(WorkbenchError, match="out of range"):
        select_units(channel_handle, "relu", method="shapley", inputs=x, target=0, candidates=[9])
    assert set(METHODS) == {"activation_difference", "dissection", "attribution", "shapley"}
    assert random_units(10, 3, seed=1) == random_units(10, 3, seed=1)
    assert not set(random_units(10, 3, seed=1, exclude=[0, 1, 2])) & {0, 1, 2}
