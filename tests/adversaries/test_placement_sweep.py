"""The paste-and-sweep protocol: placements, pasting, the calibration/test split, ranking and both controls."""

from __future__ import annotations

import pytest
import torch

from adversaries import placement_sweep as ps
from adversaries.placement_sweep import (
    PatchDesign,
    SweepConfig,
    natural_crop,
    occlusion,
    paste,
    placements,
    plan_sweep,
    resize_patch,
    run_sweep,
    thin,
)
from tests.adversaries.red_model import greyish, red_handle
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle

SMALL = SweepConfig(grid=3, sizes=(0.25, 0.375))


@pytest.fixture
def red() -> ModelHandle:
    return red_handle()


def _designs() -> list[PatchDesign]:
    """A red patch (the target's feature), a grey one and a blue one, 6 px."""
    def flat(rgb: tuple[float, float, float]) -> torch.Tensor:
        return torch.tensor(rgb).view(3, 1, 1).expand(3, 6, 6).clone()

    return [PatchDesign(flat((0.5, 0.5, 0.5)), "featvis", {"name": "grey"}),
            PatchDesign(flat((1.0, 0.0, 0.0)), "featvis", {"name": "red"}),
            PatchDesign(flat((0.0, 0.0, 1.0)), "exemplar", {"name": "blue"})]


def _run(handle, images, labels, *, config=SMALL, seed=0, **kw):
    plan = plan_sweep(handle, images, labels, 1, config=config, seed=seed)
    return plan, run_sweep(handle, images, plan, 1, _designs(), config=config, seed=seed,
                           natural_pool=(images, None), **kw)


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


def test_default_sweep_is_mu_and_andreas_6x6_positions_by_6_sizes():
    cfg = SweepConfig()
    sizes = cfg.sizes_px(red_handle(48))
    assert len(sizes) == 6 and max(sizes) == 16 and min(sizes) == 6  # the largest is a third of 48
    where = placements(48, 48, sizes, cfg.grid)
    assert len(where) == len(set(where)) == 6 * 6 * 6
    for s in sizes:
        at = [(t, l) for t, l, z in where if z == s]
        assert {t for t, _ in at} == {l for _, l in at} and len({t for t, _ in at}) == 6
        assert (0, 0) in at and (48 - s, 48 - s) in at  # corners to corners: the sweep spans the image
    assert all(0 <= t and t + z <= 48 and 0 <= l and l + z <= 48 for t, l, z in where)
    with pytest.raises(WorkbenchError, match="at most 1"):
        SweepConfig(sizes=(1.5,)).sizes_px(red_handle(48))


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


def test_occlusion_is_the_covered_share_of_the_object():
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[0, 4:8, 4:8] = True  # 16 object pixels
    where = [(0, 0, 4), (4, 4, 4), (2, 2, 4), (10, 10, 6)]
    occ = occlusion(masks, where)
    assert occ.shape == (4, 2)
    torch.testing.assert_close(occ[:, 0], torch.tensor([0.0, 1.0, 0.25, 0.0]))
    assert torch.equal(occ[:, 1], torch.zeros(4))  # an empty mask is never occluded


def test_plan_counts_correct_non_target_images_and_splits_them(red):
    images = greyish(30, seed=1)
    labels = torch.zeros(30, dtype=torch.long)
    labels[:7] = 1  # the model says "plain" for these, so they are misclassified before the patch
    plan = plan_sweep(red, images, labels, 1, config=SMALL, seed=0)
    assert sorted(plan.counted.tolist()) == list(range(7, 30))
    assert len(plan.calibration) == round(0.4 * 23) and len(plan.calibration) + len(plan.test) == 23
    assert set(plan.calibration.tolist()).isdisjoint(plan.test.tolist())
    assert plan.where == placements(16, 16, SMALL.sizes_px(red), SMALL.grid)
    again = plan_sweep(red, images, labels, 1, config=SMALL, seed=0)
    assert torch.equal(plan.calibration, again.calibration)  # the same seed, the same split
    other = plan_sweep(red, images, labels, 1, config=SMALL, seed=1)
    assert not torch.equal(plan.calibration, other.calibration)


@pytest.mark.parametrize("change, match", [
    (dict(target=5), "out of range"),
    (dict(images_offset=2.0), "expects values in"),
    (dict(config=SweepConfig(calib_fraction=1.0)), "calib_fraction"),
    (dict(labels_all_target=True), "only 0 inputs"),
])
def test_plan_refuses_bad_input(red, change, match):
    images = greyish(10) + change.get("images_offset", 0.0)
    labels = torch.ones(10, dtype=torch.long) if change.get("labels_all_target") else None
    with pytest.raises(WorkbenchError, match=match):
        plan_sweep(red, images, labels, change.get("target", 1), config=change.get("config", SMALL), seed=0)


def test_the_target_feature_wins_and_beats_both_controls(red):
    images = greyish(60)
    labels = torch.zeros(60, dtype=torch.long)
    plan, res = _run(red, images, labels, class_names=("plain", "red"))
    tensors = res.pop("_tensors")
    assert res["design"]["description"]["name"] == "red"  # ranked first on the calibration split
    assert [d.description["name"] for d in tensors["candidates"]][0] == "red"
    assert res["n_attempts"] == len(plan.test) and res["n_calibration"] == len(plan.calibration)
    assert res["success_best"] >= 0.9 and res["control_noise"] <= 0.3 and res["control_natural"] <= 0.1
    assert res["p_target_best"] > res["p_target_before"]
    assert res["per_class"]["plain"]["attempts"] == res["n_attempts"]
    assert 0.0 <= res["success_consistent"] <= res["success_best"] <= 1.0
    assert res["n_placements"] == len(plan.where) and res["placement_sizes"] == [4, 6]
    assert torch.equal(tensors["test_index"], plan.test) and len(tensors["best_index"]) == len(plan.test)


def test_controls_get_the_same_sweep_and_the_same_seed_gives_the_same_numbers(red, monkeypatch):
    calls = []
    real = ps.sweep_success

    def spy(handle, images, patch, where, target, **kw):
        calls.append((len(images), tuple(where)))
        return real(handle, images, patch, where, target, **kw)

    monkeypatch.setattr(ps, "sweep_success", spy)
    images = greyish(40, seed=4)
    labels = torch.zeros(40, dtype=torch.long)
    config = SweepConfig(grid=3, sizes=(0.25, 0.375), n_rank_placements=4)
    plan, res = _run(red, images, labels, config=config)
    full = tuple(plan.where)
    n_cal, n_test = res["n_calibration"], res["n_attempts"]
    assert [c[1] for c in calls[-6:]] == [full] * 6  # design, noise and natural: the whole sweep, both splits
    assert sorted(c[0] for c in calls[-6:]) == sorted([n_cal, n_test] * 3)
    assert all(len(c[1]) <= 4 for c in calls[:-6])  # candidates ranked on the thinned sweep
    _, again = _run(red, images, labels, config=config)
    res.pop("_tensors"), again.pop("_tensors")
    assert res == again


def test_controls_get_the_designs_own_selection(red, monkeypatch):
    """best_of_n: as many noise patches and crops as designs, ranked on the same images and placements, the best
    measured; single: one of each, from the same generator draws as the first best_of_n candidates."""
    ranked = []
    real = ps.rank_candidates

    def spy(sweep, candidates):
        out = real(sweep, candidates)
        ranked.append(out)
        return out

    monkeypatch.setattr(ps, "rank_candidates", spy)
    images = greyish(40, seed=4)
    labels = torch.zeros(40, dtype=torch.long)
    _, res = _run(red, images, labels)
    assert res["controls"]["selection"] == "best_of_n" and res["controls"]["candidates_each"] == 3
    designs, noises, naturals = ranked
    assert {d.source for _, d, _ in noises} == {"noise"} and {d.source for _, d, _ in naturals} == {"natural"}
    assert len(noises) == len(naturals) == len(designs) == 3
    assert [s for s, _, _ in noises] == sorted((s for s, _, _ in noises), reverse=True)  # best first
    tensors = res.pop("_tensors")
    assert torch.equal(tensors["patch"], designs[0][1].patch)
    ranked.clear()
    _, single = _run(red, images, labels, config=SweepConfig(grid=3, sizes=(0.25, 0.375), controls="single"))
    assert single["controls"]["candidates_each"] == 1 and len(ranked) == 1  # the controls are not ranked
    assert single["success_best"] == res["success_best"]  # the design side does not change
    assert single["control_noise"] <= max(res["control_noise"], single["control_noise"])
    with pytest.raises(WorkbenchError, match="controls"):
        SweepConfig(controls="best")  # type: ignore[arg-type]


def test_placements_over_the_object_are_not_tried_for_design_or_controls(red):
    images = greyish(40, seed=5)
    labels = torch.zeros(40, dtype=torch.long)
    everywhere = torch.ones(40, 16, 16, dtype=torch.bool)  # the "object" fills the image: every patch hides > 5%
    _, res = _run(red, images, labels, config=SweepConfig(grid=3, sizes=(0.25, 0.375), max_occlusion=0.05),
                  object_masks=everywhere)
    assert res["success_best"] == 0.0 and res["control_noise"] == 0.0 and res["control_natural"] == 0.0
    assert res["p_target_best"] == pytest.approx(res["p_target_before"], abs=1e-6)  # untried images stay as they were
    _, free = _run(red, images, labels, config=SweepConfig(grid=3, sizes=(0.25, 0.375), max_occlusion=1.0),
                   object_masks=everywhere)
    _, plain = _run(red, images, labels)
    free.pop("_tensors"), plain.pop("_tensors")
    assert free == plain  # allowing full occlusion is the same as giving no masks
    with pytest.raises(WorkbenchError, match="object_masks"):
        _run(red, images, labels, object_masks=everywhere[:3])


def test_no_design_is_an_error(red):
    images = greyish(20)
    plan = plan_sweep(red, images, None, 1, config=SMALL, seed=0)
    with pytest.raises(WorkbenchError, match="no candidate patch"):
        run_sweep(red, images, plan, 1, [], config=SMALL, seed=0, natural_pool=(images, None))


def test_natural_crop_comes_from_a_non_target_pool_image():
    pool = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(6)])
    labels = torch.tensor([1, 1, 0, 1, 1, 1])
    for seed in range(5):
        crop = natural_crop(pool, labels, 1, 3, torch.Generator().manual_seed(seed))
        assert crop.source == "natural" and crop.patch.shape == (3, 3, 3)
        assert crop.description["pool_index"] == 2 and bool((crop.patch == 2.0).all())
        y, x, y1, x1 = crop.description["box"]
        assert y1 - y == 3 and x1 - x == 3 and 0 <= y and y1 <= 8 and 0 <= x and x1 <= 8
