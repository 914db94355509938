"""Copy/paste adversary: pasting, placement sweeps, the Activation Atlas protocol and its controls."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from adversaries.base import AdversarialExamples
from adversaries.copy_paste import CopyPaste, paste, placements, resize_patch
from workbench.errors import WorkbenchError
from workbench.handle import Architecture, ImagePreprocess, ModelHandle

SMALL = dict(n_featvis=2, n_exemplars=2, featvis_steps=30, featvis_lr=0.1, grid=3, sizes=(0.25, 0.375), n_units=2)


class RedDetector(nn.Module):
    """Class 1 rises with the share of red pixels (soft detector, average-pooled); class 0 is a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.detect = nn.Conv2d(3, 2, 1)
        self.act = nn.Softplus()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.detect.weight.zero_()
            self.detect.weight[0, :, 0, 0] = torch.tensor([4.0, -2.0, -2.0])
            self.detect.bias[:] = torch.tensor([-1.0, 0.0])
            self.fc.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0]]))
            self.fc.bias.copy_(torch.tensor([5.5, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.detect(x))).flatten(1))


@pytest.fixture
def red_handle() -> ModelHandle:
    pre = ImagePreprocess(height=16, width=16, class_names=("plain", "red"))
    return ModelHandle(spec="test:red", model=RedDetector().eval(), kind="image_classifier",
                       arch=Architecture("cnn", 1), preprocess=pre)


def _greyish(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.35 + 0.3 * torch.rand(n, 3, 16, 16, generator=g)).clamp(0, 1)


def test_placements_and_paste():
    where = placements(16, 16, (4, 8), 3)
    assert len(where) == 18 and all(t + s <= 16 and l + s <= 16 for t, l, s in where)
    imgs = torch.rand(2, 3, 16, 16)
    patch = torch.zeros(3, 4, 4)
    out = paste(imgs, patch, 5, 6)
    assert torch.equal(out[:, :, 5:9, 6:10], torch.zeros(2, 3, 4, 4))
    mask = torch.ones(16, 16, dtype=torch.bool)
    mask[5:9, 6:10] = False
    assert torch.equal(out[:, :, mask], imgs[:, :, mask])  # the rest is untouched
    assert resize_patch(torch.rand(3, 8, 8), 4).shape == (3, 4, 4)
    with pytest.raises(WorkbenchError, match="does not fit"):
        paste(imgs, patch, 14, 0)
    with pytest.raises(WorkbenchError, match="does not fit"):
        placements(16, 16, (20,), 2)


def test_designed_patch_beats_the_controls(red_handle):
    images = _greyish(60)
    labels = torch.zeros(60, dtype=torch.long)
    res = CopyPaste(**SMALL).run_protocol(red_handle, images, labels, 1, class_names=("plain", "red"))
    res.pop("_tensors")
    assert res["n_attempts"] + res["n_calibration"] == 60
    assert res["success_best"] >= 0.9  # interpretation: "red" -> a red patch
    assert res["success_best"] >= 3 * max(res["control_noise"], 0.01)
    assert res["control_natural"] <= 0.1
    assert res["p_target_best"] > res["p_target_before"]
    assert res["per_class"]["plain"]["attempts"] == res["n_attempts"]
    assert 0.0 <= res["success_consistent"] <= res["success_best"] <= 1.0
    assert res["design"]["source"] in ("featvis", "exemplar")


def test_only_correct_images_count(red_handle):
    images = _greyish(30, seed=1)
    labels = torch.zeros(30, dtype=torch.long)
    labels[:7] = 1  # the model says "plain" for these, so they are misclassified before the patch
    res = CopyPaste(**SMALL).run_protocol(red_handle, images, labels, 1)
    assert res["n_excluded_incorrect_or_target"] == 7
    assert res["n_attempts"] + res["n_calibration"] == 23


def test_generate_and_registry(red_handle):
    import adversaries

    assert adversaries.get("copy-paste") is CopyPaste
    images = _greyish(24, seed=2)
    ex = CopyPaste(**SMALL).generate(red_handle, (images, torch.zeros(24, dtype=torch.long)), "red")
    assert isinstance(ex, AdversarialExamples) and ex.method == "copy-paste"
    assert len(ex) == ex.extra["n_attempts"]
    assert abs(ex.success_rate - ex.extra["success_best"]) < 1e-6
    assert ex.patch.shape[0] == 3
    summary = ex.summary()
    for key in ("success_consistent", "success_best", "control_noise", "control_natural", "n_attempts"):
        assert key in summary


def test_gray_model_without_world(gray_cnn_handle):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(30, 1, 20, 28, generator=g) * 2 - 1
    with torch.no_grad():
        preds = gray_cnn_handle.model(images).argmax(-1)
    target = int((preds.bincount(minlength=4) == 0).nonzero()[0]) if (preds.bincount(minlength=4) == 0).any() else int(preds[0] + 1) % 4
    res = CopyPaste(**SMALL).run_protocol(gray_cnn_handle, images, None, target)
    assert res["design"]["target_coverage"] is None  # no renderer ground truth for this model
    assert res["n_placements"] > 0 and 0.0 <= res["success_best"] <= 1.0


def test_bad_input(red_handle):
    images = _greyish(10)
    with pytest.raises(WorkbenchError, match="out of range"):
        CopyPaste(**SMALL).run_protocol(red_handle, images, None, 5)
    with pytest.raises(WorkbenchError, match="expects values in"):
        CopyPaste(**SMALL).run_protocol(red_handle, images + 2, None, 1)
    with pytest.raises(WorkbenchError, match="unknown target class"):
        CopyPaste(**SMALL).generate(red_handle, images, "blue")
    with pytest.raises(WorkbenchError, match="at most 1"):
        CopyPaste(**{**SMALL, "sizes": (1.5,)}).run_protocol(red_handle, images, None, 1)
    with pytest.raises(WorkbenchError, match="needs --target"):
        CopyPaste().cli_run(red_handle, argparse.Namespace(target=None))


@pytest.mark.slow
def test_shapesnet_context_patch_beats_noise(tmp_path):
    """hexagons come with an orange half-disc: a designed patch flips other shapes to hexagon."""
    import workbench
    from workbench.zoo.shapesnet import world_of

    h = workbench.load("zoo:shapesnet", device="cpu", progress=False)
    world = world_of(h)
    args = argparse.Namespace(target="hexagon", source=None, n=80, seed=0, out=str(tmp_path / "cp"), inputs=None)
    res = CopyPaste(n_featvis=4, n_exemplars=2, featvis_steps=96, grid=3, n_pool=384).cli_run(h, args)
    assert res["success_best"] >= 2 * res["control_noise"]
    assert res["design"]["target_coverage"] in (0.0, None) or res["design"]["target_coverage"] <= 0.02
    assert (tmp_path / "cp" / "grid.png").is_file() and (tmp_path / "cp" / "patch.png").is_file()
    assert set(res["per_class"]) <= set(world.classes) - {"hexagon"}
