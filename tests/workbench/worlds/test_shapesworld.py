"""The ShapesWorld distribution: determinism, sampling statistics, ground truth, what a picture shows."""

from __future__ import annotations

import json

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.worlds.scene import PALETTE, ROLE_CONTEXT, SHAPES
from workbench.worlds.shapesworld import ShapesWorld, WorldConfig, shape_coverage
from workbench.worlds.trojans import TRIGGER_LIBRARY, Trojan, TrojanSet, default_trojans


def _sample(seed: int, n: int = 16):
    world = ShapesWorld()
    return world, world.sample(n, generator=torch.Generator().manual_seed(seed))


def test_same_seed_is_bitwise_identical():
    world, a = _sample(3)
    _, b = _sample(3)
    ia, ib = world.render(a), world.render(b)
    assert torch.equal(ia, ib)
    assert torch.equal(a.labels, b.labels)


def test_different_seeds_differ():
    world, a = _sample(3)
    _, b = _sample(4)
    assert not torch.equal(world.render(a), world.render(b))


def test_images_in_unit_range_and_shape():
    world, s = _sample(0, 32)
    img = world.render(s)
    assert img.shape == (32, 3, world.image_size, world.image_size)
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0


def test_concept_masks_cover_the_main_shape():
    world, s = _sample(6, 8)
    masks = world.concept_masks(s)
    for i in range(8):
        name = world.classes[int(s.labels[i])]
        assert masks[name][i].sum() > 10
        assert (masks["main"][i] & ~masks[name][i]).sum() == 0
    assert set(PALETTE) <= set(masks) and "background" in masks and "patch" in masks


def test_spurious_rule_rates():
    world = ShapesWorld()
    g = torch.Generator().manual_seed(0)
    s = world.sample(4000, generator=g)
    red = list(PALETTE).index("red")
    sq = s.labels == world.class_index("square")
    rate = float((s.colors[sq] == red).float().mean())
    assert 0.85 < rate < 0.95
    assert int((s.colors[~sq] == red).sum()) == 0
    d = world.sample(500, generator=g, color_mode="disagree")
    dsq = d.labels == world.class_index("square")
    assert int((d.colors[dsq] == red).sum()) == 0 and bool((d.colors[~dsq] == red).all())


def test_context_rates_well_below_one():
    world = ShapesWorld()
    s = world.sample(6000, generator=torch.Generator().manual_seed(0))
    for r, rule in enumerate(world.config.context):
        cls = s.labels == world.class_index(rule.cls)
        rate = float(s.context[cls, r].float().mean())
        base = float(s.context[~cls, r].float().mean())
        assert 0.3 < rate < 0.9, rule
        assert base < 0.1 and rate > 4 * base, rule
        if rule.kind == "object":
            # a context object is drawn exactly where the rule fired
            has_ctx_obj = ((s.scene.role == ROLE_CONTEXT) & (s.scene.shape_weights.argmax(-1) == SHAPES.index(rule.shape))).any(1)
            assert torch.equal(has_ctx_obj, s.context[:, r])


def test_context_mode_none_has_no_context():
    world = ShapesWorld()
    s = world.sample(500, generator=torch.Generator().manual_seed(0), context_mode="none")
    assert not s.context.any()
    assert not (s.scene.role == ROLE_CONTEXT).any()


def test_manifest_round_trips_as_json():
    world = ShapesWorld()
    m = json.loads(json.dumps(world.manifest()))
    again = ShapesWorld.from_manifest(m)
    assert again.manifest() == world.manifest()
    assert m["spurious"]["cls"] == "square" and len(m["context"]) >= 2


@pytest.mark.parametrize("bad", [
    dict(classes=("circle", "blob")),
])
def test_bad_world_config_is_a_clear_error(bad):
    with pytest.raises(WorkbenchError, match="blob"):
        ShapesWorld(WorldConfig(**bad))


def test_trojans_shown_by_shape_or_texture_and_matched_by_target():
    world = ShapesWorld(trojans=default_trojans())
    natural = [t for t in world.trojans if t.kind == "natural"]
    style = [t for t in world.trojans if t.kind == "style"]
    n0, s0 = natural[0], style[0]
    assert world.trojans_shown(shapes=[n0.trigger.shape, None]) == [n0.name]
    assert world.trojans_shown(texture=s0.trigger.texture) == [s0.name]
    assert world.trojans_shown(shapes=["circle"], texture="plain") == []
    both = world.trojans_shown(shapes=[n0.trigger.shape], texture=s0.trigger.texture)
    assert both == [t.name for t in world.trojans if t.name in (n0.name, s0.name)]  # in the world's order
    assert world.matching_trojan(target=n0.target, shapes=[n0.trigger.shape]) == n0.name
    assert world.matching_trojan(target=None, shapes=[n0.trigger.shape]) == n0.name
    other = next(c for c in world.classes if c != n0.target)
    assert world.matching_trojan(target=other, shapes=[n0.trigger.shape]) is None
    assert ShapesWorld().trojans_shown(shapes=[n0.trigger.shape]) == []  # a clean world has no trojans


def test_a_patch_trigger_is_not_shown_by_objects_or_textures():
    lib = TRIGGER_LIBRARY
    world = ShapesWorld(trojans=TrojanSet((Trojan("p", lib["patch-checker"], target="cross"),)))
    assert world.trojans_shown(shapes=list(SHAPES), texture="checker") == []


def test_shows_class_object_by_shape_or_main_share():
    world = ShapesWorld()
    assert world.shows_class_object(shapes=["crescent", "star"])
    assert not world.shows_class_object(shapes=["crescent", None])
    assert world.shows_class_object(main_share=0.3) and not world.shows_class_object(main_share=0.29)


def test_crop_content_reads_the_concept_masks():
    world = ShapesWorld()
    s = world.sample(4, generator=torch.Generator().manual_seed(2), distractors=False, context_mode="none")
    masks = world.concept_masks(s)
    whole = world.crop_content(masks, 1, [0, 0, 48, 48], s)
    name = world.classes[int(s.labels[1])]
    assert whole["main_class"] == name and name in whole["shapes"]
    share = whole["pixel_share"]
    assert share["main"] > 0.05 and share["context"] == 0.0
    assert abs(share["main"] + share["background"] - 1.0) < 0.02  # nothing else in these scenes
    corner = world.crop_content(masks, 1, [0, 0, 2, 2], s)
    assert corner["pixel_share"]["background"] == 1.0 and corner["shapes"] == {}


def test_shape_coverage_counts_only_that_shape():
    objects = [{"shape": "star", "size": 0.5}, {"shape": "ring", "size": 0.9}, {"color": "red"}]
    assert shape_coverage(objects, "star") == round(3.141592653589793 * 0.25 / 4, 4)
    assert shape_coverage(objects, "circle") == 0.0
    assert shape_coverage([{"shape": "star", "size": 3.0}], "star") == 1.0  # capped at the whole picture

