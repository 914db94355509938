"""Copy/paste adversary: patches designed from an interpretation, measured by the Activation Atlas protocol."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adversaries.base import AdversarialExamples
from adversaries.copy_paste import CopyPaste, DesignConfig, paste_on_sources
from adversaries.placement_sweep import SweepConfig
from tests.adversaries.red_model import greyish, red_handle
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle

SMALL = CopyPaste(design=DesignConfig(n_featvis=2, n_exemplars=2, featvis_steps=30, featvis_lr=0.1, n_units=2),
                  sweep=SweepConfig(grid=3, sizes=(0.25, 0.375)))


@pytest.fixture
def red() -> ModelHandle:
    return red_handle()


def test_config_groups_design_and_sweep_options():
    cfg = CopyPaste()
    assert cfg.design == DesignConfig() and cfg.sweep == SweepConfig() and cfg.seed == 0
    assert cfg.design.kind == "auto" and cfg.sweep.grid == 6
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.design.kind = "featvis"  # type: ignore[misc]


def test_designed_patch_beats_the_controls(red):
    images = greyish(60)
    labels = torch.zeros(60, dtype=torch.long)
    res = SMALL.run_protocol(red, images, labels, 1, class_names=("plain", "red"))
    res.pop("_tensors")
    assert res["n_attempts"] + res["n_calibration"] == 60
    assert res["success_best"] >= 0.9  # interpretation: "red" -> a red patch
    assert res["success_best"] >= 3 * max(res["control_noise"], 0.01)
    assert res["control_natural"] <= 0.1
    assert res["p_target_best"] > res["p_target_before"]
    assert res["per_class"]["plain"]["attempts"] == res["n_attempts"]
    assert 0.0 <= res["success_consistent"] <= res["success_best"] <= 1.0
    assert res["design"]["source"] in ("featvis", "exemplar")
    assert res["site"] and res["units"] and res["design_size"] == 6  # the designer's own account, after the metrics


def test_only_correct_images_count(red):
    images = greyish(30, seed=1)
    labels = torch.zeros(30, dtype=torch.long)
    labels[:7] = 1  # the model says "plain" for these, so they are misclassified before the patch
    res = SMALL.run_protocol(red, images, labels, 1)
    assert res["n_excluded_incorrect_or_target"] == 7
    assert res["n_attempts"] + res["n_calibration"] == 23


def test_generate_and_registry(red):
    import adversaries

    assert adversaries.get("copy-paste") is CopyPaste
    images = greyish(24, seed=2)
    ex = SMALL.generate(red, (images, torch.zeros(24, dtype=torch.long)), "red", progress=False)
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
    res = SMALL.run_protocol(gray_cnn_handle, images, None, target)
    assert res["design"]["target_coverage"] is None  # no renderer ground truth for this model
    assert res["design"]["content"] == "unknown (no ground truth)"
    assert res["n_placements"] > 0 and 0.0 <= res["success_best"] <= 1.0


def test_bad_input(red):
    images = greyish(10)
    with pytest.raises(WorkbenchError, match="out of range"):
        SMALL.run_protocol(red, images, None, 5)
    with pytest.raises(WorkbenchError, match="expects values in"):
        SMALL.run_protocol(red, images + 2, None, 1)
    with pytest.raises(WorkbenchError, match="unknown target class"):
        SMALL.generate(red, images, "blue")
    with pytest.raises(WorkbenchError, match="at most 1"):
        CopyPaste(design=SMALL.design, sweep=SweepConfig(sizes=(1.5,))).run_protocol(red, images, None, 1)
    with pytest.raises(WorkbenchError, match="image tensor"):
        SMALL.generate(red, [images], 1)


def test_same_seed_same_numbers_and_designs_made_once_give_the_same_numbers(red):
    images = greyish(40, seed=4)
    labels = torch.zeros(40, dtype=torch.long)
    res = SMALL.run_protocol(red, images, labels, 1)
    again = SMALL.run_protocol(red, images, labels, 1)
    res.pop("_tensors"), again.pop("_tensors")
    assert res == again
    plan = SMALL.plan(red, images, labels, 1)
    assert len(plan.calibration) == res["n_calibration"] and len(plan.test) == res["n_attempts"]
    reused = SMALL.run_protocol(red, images, labels, 1, designs=SMALL.design_patches(red, 1, images[plan.calibration]))
    reused.pop("_tensors")
    assert reused == res


def test_design_kind_chooses_the_candidates(red):
    images = greyish(30, seed=6)
    plan = SMALL.plan(red, images, None, 1)
    only_ex = CopyPaste(design=DesignConfig(kind="exemplar", n_exemplars=2, n_units=2), sweep=SMALL.sweep)
    designs, info = only_ex.design_patches(red, 1, images[plan.calibration])
    assert designs and {d.source for d in designs} == {"exemplar"} and info["design_size"] == 6
    featvis = DesignConfig(kind="featvis", n_featvis=2, n_featvis_context=1, featvis_steps=10, n_units=2)
    only_fv = CopyPaste(design=featvis, sweep=SMALL.sweep)
    designs, _ = only_fv.design_patches(red, 1, images[plan.calibration])
    assert {d.source for d in designs} == {"featvis"}
    assert {d.description["canvas"] for d in designs} == {"grey", "source images"}


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


@pytest.mark.slow
def test_shapesnet_context_patch_beats_noise():
    """hexagons come with an orange half-disc: a designed patch flips other shapes to hexagon."""
    import workbench
    from workbench.zoo.shapesnet import world_of

    h = workbench.load("zoo:shapesnet", device="cpu", progress=False)
    world = world_of(h)
    classes = [c for c in world.classes if c != "hexagon"]
    sample = world.sample(80, generator=torch.Generator().manual_seed(1000), classes=classes, context_mode="none")
    cfg = CopyPaste(design=DesignConfig(n_featvis=4, n_featvis_context=2, n_exemplars=2, featvis_steps=96, n_pool=384),
                    sweep=SweepConfig(grid=3, sizes=(0.21, 0.27, 0.33)))
    ex = cfg.generate(h, (world.render(sample), sample.labels), "hexagon")
    res = ex.extra
    assert res["success_best"] >= 2 * res["control_noise"]
    assert res["design"]["target_coverage"] in (0.0, None) or res["design"]["target_coverage"] <= 0.02
    assert set(res["per_class"]) <= set(classes)
    for c in res["candidates"]:
        assert c["content"] in ("trojan trigger", "another class's object", "context feature")
        assert (c["content"] == "trojan trigger") == (c["trojan"] is not None)
