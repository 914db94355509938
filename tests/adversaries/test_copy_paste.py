"""Copy/paste adversary: pasting, placement sweeps, the Activation Atlas protocol and its controls."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from adversaries.base import AdversarialExamples
from adversaries.copy_paste import CopyPaste, occlusion, paste, paste_on_sources, placements, resize_patch, thin
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


def test_default_sweep_is_mu_and_andreas_6x6_positions_by_6_sizes(red_handle):
    cfg = CopyPaste()
    pre48 = ImagePreprocess(height=48, width=48, class_names=("a", "b"))
    h48 = ModelHandle(spec="test:48", model=RedDetector().eval(), kind="image_classifier", arch=Architecture("cnn", 1),
                      preprocess=pre48)
    sizes = cfg.sizes_px(h48)
    assert len(sizes) == 6 and max(sizes) == 16 and min(sizes) == 6  # the largest is the old largest (a third of 48)
    where = placements(48, 48, sizes, cfg.grid)
    assert len(where) == len(set(where)) == 6 * 6 * 6
    for s in sizes:
        at = [(t, l) for t, l, z in where if z == s]
        assert {t for t, _ in at} == {l for _, l in at} and len({t for t, _ in at}) == 6
        assert (0, 0) in at and (48 - s, 48 - s) in at  # corners to corners: the sweep spans the image
    assert all(0 <= t and t + z <= 48 and 0 <= l and l + z <= 48 for t, l, z in where)


@pytest.mark.parametrize("at_most", [1, 7, 54, 216, 500])
def test_thinned_sweep_is_an_even_subset(at_most):
    where = placements(48, 48, (6, 8, 10, 12, 14, 16), 6)
    sub = thin(where, at_most)
    assert 1 <= len(sub) <= at_most and set(sub) <= set(where)
    assert sub == sorted(sub, key=where.index)  # same order as the full sweep
    if at_most >= 36:
        assert {z for _, _, z in sub} == {z for _, _, z in where}  # every size is still tried
    if at_most >= len(where):
        assert sub == where
    with pytest.raises(WorkbenchError):
        thin(where, 0)


def test_paste_on_sources_keeps_the_source_and_passes_gradients():
    bank = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    tf = paste_on_sources(bank, 6, (4, 6))
    canvas = torch.full((3, 3, 16, 16), 0.5)
    patch = torch.rand(3, 3, 6, 6, requires_grad=True)
    x = canvas.clone()
    x[:, :, 5:11, 5:11] = patch
    out = tf(x, torch.Generator().manual_seed(3))
    again = tf(x, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # same generator seed, same pictures
    assert out.shape == x.shape
    for b in range(3):  # each output is one bank image with a small square changed
        diffs = [(out[b].detach() - bank[i]).abs().sum(0) > 0 for i in range(5)]
        changed = min(int(d.sum()) for d in diffs)
        assert changed <= 36
    out.sum().backward()
    assert patch.grad is not None and float(patch.grad.abs().sum()) > 0
    with pytest.raises(WorkbenchError):
        paste_on_sources(bank[:0], 6, (6,))


def test_controls_get_the_same_sweep_and_the_same_seed_gives_the_same_numbers(red_handle, monkeypatch):
    import adversaries.copy_paste as cp

    calls = []
    real = cp.sweep_success

    def spy(handle, images, patch, where, target, **kw):
        calls.append((len(images), tuple(where)))
        return real(handle, images, patch, where, target, **kw)

    monkeypatch.setattr(cp, "sweep_success", spy)
    images = _greyish(40, seed=4)
    labels = torch.zeros(40, dtype=torch.long)
    cfg = CopyPaste(**{**SMALL, "n_rank_placements": 4})
    res = cfg.run_protocol(red_handle, images, labels, 1)
    full = tuple(placements(16, 16, cfg.sizes_px(red_handle), cfg.grid))
    n_cal, n_test = res["n_calibration"], res["n_attempts"]
    assert [c[1] for c in calls[-6:]] == [full] * 6  # design, noise and natural: the whole sweep, both splits
    assert sorted(c[0] for c in calls[-6:]) == sorted([n_cal, n_test] * 3)
    assert all(len(c[1]) <= 4 for c in calls[:-6])  # candidates ranked on the thinned sweep
    assert res["n_placements"] == len(full)
    again = CopyPaste(**{**SMALL, "n_rank_placements": 4}).run_protocol(red_handle, images, labels, 1)
    res.pop("_tensors"), again.pop("_tensors")
    assert res == again
    # designs made once and passed in give the same numbers as designing inside the protocol
    cal, test = cfg.calibration_split(red_handle, images, labels, 1)
    assert len(cal) == n_cal and len(test) == n_test
    reused = cfg.run_protocol(red_handle, images, labels, 1, designs=cfg.design_patches(red_handle, 1, images[cal]))
    reused.pop("_tensors")
    assert reused == res


def test_occlusion_is_the_covered_share_of_the_object():
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 4:8, 4:8] = True  # 16 object pixels
    where = [(0, 0, 4), (4, 4, 4), (2, 2, 4), (10, 10, 6)]
    occ = occlusion(masks, where)
    assert occ.shape == (4, 2)
    torch.testing.assert_close(occ[:, 0], torch.tensor([0.0, 1.0, 0.25, 0.0]))
    assert torch.equal(occ[:, 1], torch.zeros(4))  # an empty mask is never occluded


def test_placements_over_the_object_are_not_tried_for_design_or_controls(red_handle):
    images = _greyish(40, seed=5)
    labels = torch.zeros(40, dtype=torch.long)
    everywhere = torch.ones(40, 16, 16, dtype=torch.bool)  # the "object" fills the image: every patch hides > 5%
    cfg = CopyPaste(**{**SMALL, "max_occlusion": 0.05})
    res = cfg.run_protocol(red_handle, images, labels, 1, object_masks=everywhere)
    assert res["success_best"] == 0.0 and res["control_noise"] == 0.0 and res["control_natural"] == 0.0
    assert res["p_target_best"] == pytest.approx(res["p_target_before"], abs=1e-6)  # untried images stay as they were
    free = CopyPaste(**{**SMALL, "max_occlusion": 1.0}).run_protocol(red_handle, images, labels, 1, object_masks=everywhere)
    plain = CopyPaste(**SMALL).run_protocol(red_handle, images, labels, 1)
    free.pop("_tensors"), plain.pop("_tensors")
    assert free == plain  # allowing full occlusion is the same as giving no masks
    with pytest.raises(WorkbenchError, match="object_masks"):
        cfg.run_protocol(red_handle, images, labels, 1, object_masks=everywhere[:3])


@pytest.mark.slow
def test_shapesnet_context_patch_beats_noise(tmp_path):
    """hexagons come with an orange half-disc: a designed patch flips other shapes to hexagon."""
    import workbench
    from workbench.zoo.shapesnet import world_of

    h = workbench.load("zoo:shapesnet", device="cpu", progress=False)
    world = world_of(h)
    args = argparse.Namespace(target="hexagon", source=None, n=80, seed=0, out=str(tmp_path / "cp"), inputs=None)
    res = CopyPaste(n_featvis=4, n_featvis_context=2, n_exemplars=2, featvis_steps=96, grid=3,
                    sizes=(0.21, 0.27, 0.33), n_pool=384).cli_run(h, args)
    assert res["success_best"] >= 2 * res["control_noise"]
    assert res["design"]["target_coverage"] in (0.0, None) or res["design"]["target_coverage"] <= 0.02
    assert (tmp_path / "cp" / "grid.png").is_file() and (tmp_path / "cp" / "patch.png").is_file()
    assert set(res["per_class"]) <= set(world.classes) - {"hexagon"}
