"""PGD: budgets in the declared range, explicit normalization, targeted/untargeted, errors, divergence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adversaries.pgd import PGD, pgd
from workbench.errors import WorkbenchError
from workbench.handle import Architecture, ImagePreprocess, ModelHandle

HANDLES = ("cnn_handle", "gray_cnn_handle")


def _images(handle: ModelHandle, n: int = 12, seed: int = 0) -> torch.Tensor:
    pre = handle.preprocess
    lo, hi = pre.input_range
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, pre.channels, pre.height, pre.width, generator=g)


@pytest.mark.parametrize("fixture", HANDLES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_budget_range_and_loss_increase(request: pytest.FixtureRequest, fixture: str, norm: str) -> None:
    h = request.getfixturevalue(fixture)
    x = _images(h)
    eps = 0.1 if norm == "linf" else 1.0
    ae = PGD(norm=norm, eps=eps, step_size=eps / 4, steps=8).generate(h, x, None)
    lo, hi = h.preprocess.input_range
    scale = hi - lo
    assert float(ae.adversarial.min()) >= lo - 1e-6 and float(ae.adversarial.max()) <= hi + 1e-6
    flat = ae.perturbation.flatten(1)
    if norm == "linf":
        assert float(flat.abs().max()) <= eps * scale + 1e-5
    else:
        assert float(flat.norm(dim=1).max()) <= eps * scale + 1e-4
    assert ae.loss_trace[-1] > ae.loss_trace[0]
    assert torch.isfinite(ae.adversarial).all()
    # untargeted success means the prediction moved off the clean prediction
    assert torch.equal(ae.success, ae.adversarial_pred != ae.original_pred)


@pytest.mark.parametrize("fixture", HANDLES)
def test_targeted_beats_random_noise_of_same_budget(request: pytest.FixtureRequest, fixture: str) -> None:
    h = request.getfixturevalue(fixture)
    x = _images(h, n=16)
    cfg = PGD(eps=0.3, step_size=0.05, steps=20)
    ae = cfg.generate(h, x, 1)
    lo, hi = h.preprocess.input_range
    g = torch.Generator().manual_seed(3)
    noise = (x + (torch.rand(x.shape, generator=g) * 2 - 1) * 0.3 * (hi - lo)).clamp(lo, hi)
    with torch.no_grad():
        probs = h.model(noise).softmax(1)
    noise_prob, noise_rate = float(probs[:, 1].mean()), float((probs.argmax(1) == 1).float().mean())
    assert ae.extra["target_prob_after"] > max(ae.extra["target_prob_before"], noise_prob) + 0.01
    assert ae.success_rate >= noise_rate
    assert torch.equal(ae.success, ae.adversarial_pred == 1)


def test_same_seed_same_numbers_and_seed_matters(cnn_handle: ModelHandle) -> None:
    x = _images(cnn_handle)
    a = PGD(seed=1).generate(cnn_handle, x, 2)
    b = PGD(seed=1).generate(cnn_handle, x, 2)
    c = PGD(seed=2).generate(cnn_handle, x, 2)
    assert torch.equal(a.adversarial, b.adversarial) and a.loss_trace == b.loss_trace
    assert not torch.equal(a.adversarial, c.adversarial)


@pytest.mark.parametrize("fixture", HANDLES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("target", [None, 1])
@pytest.mark.parametrize("channels_last", [True, False])
def test_generate_images_are_the_core_loops(request: pytest.FixtureRequest, fixture: str, norm: str,
                                           target: int | None, channels_last: bool) -> None:
    h = request.getfixturevalue(fixture)
    x = _images(h, n=10)
    cfg = PGD(norm=norm, eps=0.1 if norm == "linf" else 1.0, step_size=0.03, steps=4, seed=3, batch_size=4,
              channels_last=channels_last)
    ae = cfg.generate(h, x, target)
    ref = ae.original_pred if target is None else torch.full((len(x),), target)
    adv, trace, diverged = pgd(h, x, ref, config=cfg, targeted=target is not None)
    assert torch.equal(ae.adversarial, adv) and ae.loss_trace == trace and diverged is None


class _NoNorm(nn.Module):
    """The gray CNN without its internal normalization (the caller must normalize)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.inner
        x = m.relu2(m.conv2(m.relu1(m.conv1(x))))
        return m.fc(m.pool(x).flatten(1))


def test_normalization_outside_the_model_is_applied_not_guessed(gray_cnn_handle: ModelHandle) -> None:
    pre = gray_cnn_handle.preprocess
    outside = ModelHandle(
        spec="test:gray-outside", model=_NoNorm(gray_cnn_handle.model), kind="image_classifier",
        arch=Architecture(family="cnn", n_layers=2),
        preprocess=ImagePreprocess(height=pre.height, width=pre.width, channels=1, input_range=(-1.0, 1.0),
                                   mean=(0.1,), std=(0.6,), normalization_in_model=False, class_names=pre.class_names))
    x = _images(gray_cnn_handle)
    a = PGD(eps=0.1, steps=5).generate(gray_cnn_handle, x, None)
    b = PGD(eps=0.1, steps=5).generate(outside, x, None)
    assert torch.allclose(a.adversarial, b.adversarial, atol=1e-5)
    assert torch.equal(a.success, b.success)


def test_labels_define_untargeted_success(cnn_handle: ModelHandle) -> None:
    x = _images(cnn_handle)
    labels = torch.zeros(len(x), dtype=torch.long)
    ae = PGD(eps=0.05, steps=3).generate(cnn_handle, (x, labels), None)
    assert torch.equal(ae.success, ae.adversarial_pred != labels)
    assert ae.extra["clean_accuracy"] is not None


@pytest.mark.parametrize("bad, match", [
    ("range", "expects values in"),
    ("shape", "expected \\(N, 3, 16, 16\\)"),
    ("single", "single image"),
    ("nan", "NaN"),
    ("uint8", "dtype"),
])
def test_bad_images_are_clear_errors(cnn_handle: ModelHandle, bad: str, match: str) -> None:
    x = _images(cnn_handle, n=2)
    if bad == "range":
        x = x * 3
    elif bad == "shape":
        x = torch.rand(2, 3, 8, 8)
    elif bad == "single":
        x = x[0]
    elif bad == "nan":
        x[0, 0, 0, 0] = float("nan")
    else:
        x = (x * 255).to(torch.uint8)
    with pytest.raises(WorkbenchError, match=match):
        PGD().generate(cnn_handle, x, None)


@pytest.mark.parametrize("target, match", [(7, "out of range"), ("zebra", "unknown target class"), (-1, "out of range")])
def test_bad_targets(cnn_handle: ModelHandle, target: object, match: str) -> None:
    with pytest.raises(WorkbenchError, match=match):
        PGD().generate(cnn_handle, _images(cnn_handle, n=2), target)


def test_bad_config() -> None:
    with pytest.raises(WorkbenchError, match="norm"):
        PGD(norm="l3")  # type: ignore[arg-type]
    with pytest.raises(WorkbenchError, match="eps"):
        PGD(eps=0)


class _Exploding(nn.Module):
    """Logits fine on the forward pass but NaN gradients (sqrt at 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) + torch.sqrt(x.flatten(1)[:, :1] * 0)


def test_divergence_is_detected_and_images_stay_finite() -> None:
    h = ModelHandle(spec="test:nan", model=_Exploding(), kind="image_classifier",
                    arch=Architecture(family="cnn", n_layers=1),
                    preprocess=ImagePreprocess(height=16, width=16))
    ae = PGD(steps=3, random_start=False).generate(h, torch.rand(4, 3, 16, 16), None)
    assert torch.isfinite(ae.adversarial).all()
    assert ae.extra["diverged"]["step"] == 0


class _ExplodingSome(nn.Module):
    """NaN input gradients for the items whose first pixel is below 0.5; finite logits for all."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x[:, :1, 0, 0]
        return self.fc(x.flatten(1)) + torch.sqrt(torch.where(first < 0.5, first * 0, torch.ones_like(first)))


def test_only_items_with_nonfinite_gradients_are_held() -> None:
    h = ModelHandle(spec="test:nan-some", model=_ExplodingSome(), kind="image_classifier",
                    arch=Architecture(family="cnn", n_layers=1),
                    preprocess=ImagePreprocess(height=16, width=16))
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[:4, 0, 0, 0] = 0.2
    x[4:, 0, 0, 0] = 0.9
    ae = PGD(eps=0.05, steps=3, random_start=False).generate(h, x, None)
    assert torch.equal(ae.adversarial[:4], x[:4])
    assert bool((ae.perturbation[4:].flatten(1).abs().amax(1) > 0).all())
    assert ae.extra["diverged"]["steps_affected"] == 3
