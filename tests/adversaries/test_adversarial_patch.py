"""Adversarial patch: exact pasting, placements inside the image, range, training, errors."""

from __future__ import annotations

import math

import pytest
import torch

from adversaries.adversarial_patch import (
    AdversarialPatch,
    apply_patch,
    fixed_placements,
    patch_pixels,
    sample_placements,
)
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle

HANDLES = ("cnn_handle", "gray_cnn_handle")


def _images(handle: ModelHandle, n: int = 16, seed: int = 0) -> torch.Tensor:
    pre = handle.preprocess
    lo, hi = pre.input_range
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, pre.channels, pre.height, pre.width, generator=g)


def test_unrotated_unscaled_paste_is_exact() -> None:
    x = torch.rand(2, 3, 20, 28)
    p = torch.rand(3, 6, 6)
    y, mask = apply_patch(x, p, fixed_placements(2, cx=10.0, cy=8.0))
    assert torch.allclose(y[:, :, 5:11, 7:13], p.expand(2, -1, -1, -1), atol=1e-6)
    outside = torch.ones(20, 28, dtype=torch.bool)
    outside[5:11, 7:13] = False
    assert torch.equal(y[:, :, outside], x[:, :, outside])
    assert float(mask.sum()) == pytest.approx(2 * 36, abs=1e-4)


@pytest.mark.parametrize("rotation_max, scale", [(0.0, (1.0, 1.0)), (45.0, (0.7, 1.3))])
def test_random_placements_stay_inside(rotation_max: float, scale: tuple[float, float]) -> None:
    g = torch.Generator().manual_seed(0)
    pl = sample_placements(64, height=20, width=28, patch_hw=(6, 6), generator=g, scale_range=scale, rotation_max=rotation_max)
    assert float(pl[:, 3].abs().max()) <= math.radians(rotation_max) + 1e-6
    x = torch.zeros(64, 1, 20, 28)
    _, mask = apply_patch(x, torch.ones(1, 6, 6), pl)
    # the patch's whole area lands in the image: coverage equals (scaled) area, none is cut off
    assert torch.allclose(mask.sum((1, 2, 3)), 36 * pl[:, 2] ** 2, rtol=0.08)


def test_patch_larger_than_image_is_an_error(cnn_handle: ModelHandle) -> None:
    with pytest.raises(WorkbenchError, match="does not fit"):
        patch_pixels(cnn_handle.preprocess, pixels=17)
    with pytest.raises(WorkbenchError, match="does not fit"):
        AdversarialPatch(patch_pixels=40).generate(cnn_handle, _images(cnn_handle, n=2), 1)
    with pytest.raises(WorkbenchError, match="larger than"):
        apply_patch(torch.rand(1, 3, 8, 8), torch.rand(3, 9, 9), fixed_placements(1, cx=4, cy=4))


@pytest.mark.parametrize("fixture", HANDLES)
def test_trained_patch_raises_target_probability(request: pytest.FixtureRequest, fixture: str) -> None:
    h = request.getfixturevalue(fixture)
    ae = AdversarialPatch(patch_frac=0.5, steps=40, lr=0.3, batch_size=16, eval_placements=2).generate(h, _images(h), 2)
    pre = h.preprocess
    lo, hi = pre.input_range
    side = ae.extra["patch_side_pixels"]
    assert ae.patch.shape == (pre.channels, side, side)
    assert float(ae.patch.min()) >= lo and float(ae.patch.max()) <= hi
    assert float(ae.adversarial.min()) >= lo - 1e-6 and float(ae.adversarial.max()) <= hi + 1e-6
    assert sum(ae.loss_trace[-5:]) / 5 < sum(ae.loss_trace[:5]) / 5
    assert ae.extra["target_prob_after"] > ae.extra["target_prob_before"]
    assert 0.0 <= ae.extra["control_noise"] <= 1.0


def test_same_seed_same_patch(cnn_handle: ModelHandle) -> None:
    x = _images(cnn_handle, n=8)
    cfg = AdversarialPatch(steps=5, batch_size=4, eval_placements=1)
    a, b = cfg.generate(cnn_handle, x, 1), cfg.generate(cnn_handle, x, 1)
    assert torch.equal(a.patch, b.patch) and torch.equal(a.adversarial, b.adversarial)


def test_bad_config() -> None:
    with pytest.raises(WorkbenchError, match="scale_range"):
        AdversarialPatch(scale_range=(1.2, 0.8))
    with pytest.raises(WorkbenchError, match="shape"):
        AdversarialPatch(shape="star")  # type: ignore[arg-type]


class _Exploding(torch.nn.Module):
    """Finite logits, NaN input gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 16 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) + torch.sqrt(x.flatten(1)[:, :1] * 0)


@pytest.mark.parametrize("method", ["patch", "feature-level"])
def test_divergence_is_reported_and_outputs_stay_finite(method: str) -> None:
    from adversaries.feature_level import FeatureLevel
    from workbench.handle import Architecture, ImagePreprocess

    h = ModelHandle(spec="test:nan", model=_Exploding(), kind="image_classifier", arch=Architecture(family="cnn", n_layers=1),
                    preprocess=ImagePreprocess(height=16, width=16))
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    gen = AdversarialPatch(steps=3, batch_size=4, eval_placements=1) if method == "patch" else FeatureLevel(steps=3, restarts=1, eot=1)
    ae = gen.generate(h, x, 1)
    assert torch.isfinite(ae.adversarial).all()
    assert ae.extra["diverged"]["step"] == 0
