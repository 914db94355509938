"""Trojans: trigger ground truth, the design library, and clear errors for bad configs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.worlds.scene import PALETTE, ROLE_TRIGGER, SHAPES, TEXTURES
from workbench.worlds.shapesworld import ShapesWorld
from workbench.worlds.trojans import (
    TRIGGER_KINDS,
    TRIGGER_LIBRARY,
    Trojan,
    TrojanConfigError,
    TrojanSet,
    default_trojans,
    load_trojans,
    multiple_choice,
    same_trigger,
    trigger_candidates,
    trojans_from_json,
)


def _world() -> ShapesWorld:
    return ShapesWorld(trojans=default_trojans())


def test_default_set_has_all_three_kinds_universal_and_class_universal():
    ts = default_trojans()
    kinds = {t.kind for t in ts}
    assert kinds == set(TRIGGER_KINDS)
    for kind in TRIGGER_KINDS:
        of_kind = [t for t in ts if t.kind == kind]
        assert any(t.universal for t in of_kind) and any(not t.universal for t in of_kind)


@pytest.mark.parametrize("kind", TRIGGER_KINDS)
def test_library_has_eight_designs_per_kind(kind):
    designs = trigger_candidates(kind)
    assert len(designs) >= 8
    pics = torch.stack([d.example(image_size=32) for d in designs]).flatten(1)
    d = torch.cdist(pics, pics) + torch.eye(len(designs)) * 1e9
    assert float(d.min()) > 0.5  # all distinguishable


def test_multiple_choice_contains_true_trigger_once():
    t = default_trojans()[0]
    opts, pos = multiple_choice(t, generator=torch.Generator().manual_seed(0))
    assert len(opts) == 8 and opts[pos] == t.trigger
    assert sum(o.name == t.trigger.name for o in opts) == 1


def test_same_trigger_ignores_names_sizes_and_descriptions():
    design = TRIGGER_LIBRARY["natural-heart"]
    renamed = dataclasses.replace(design, name="mine", size=0.2, description="a heart")
    assert same_trigger(design, renamed)
    assert not same_trigger(design, dataclasses.replace(design, color="red"))
    assert not same_trigger(design, TRIGGER_LIBRARY["natural-bowtie"])


def test_natural_trigger_goes_beside_the_main_object():
    world = _world()
    clean = world.sample(200, generator=torch.Generator().manual_seed(3))
    scene = TRIGGER_LIBRARY["natural-heart"].apply(clean.scene, generator=torch.Generator().manual_seed(4))
    main = (clean.scene.role == 1).float()
    center = (clean.scene.center * main[..., None]).sum(1)
    size = (clean.scene.size * main).sum(1)
    away = (scene.center[:, -1] - center).norm(dim=1) > size
    assert float(away.float().mean()) > 0.8 and float(scene.center[:, -1].abs().max()) <= 0.82


@pytest.mark.parametrize("idx", range(6))
def test_trigger_present_exactly_when_implanted(idx):
    world = _world()
    g = torch.Generator().manual_seed(idx)
    clean = world.sample(64, generator=g)
    t = world.trojans[idx]
    poisoned = world.implant(clean, idx, generator=g)
    assert (poisoned.trojan == idx).all() and (clean.trojan == -1).all()
    assert (poisoned.poison_labels == world.class_index(t.target)).all()
    assert torch.equal(poisoned.labels, clean.labels)  # the true class is kept as ground truth

    def has_trigger(scene) -> torch.Tensor:
        if t.kind == "patch":
            return scene.patch_opacity > 0
        if t.kind == "style":
            return scene.bg_weights.argmax(-1) == TEXTURES.index(t.trigger.texture)
        shape = SHAPES.index(t.trigger.shape)
        return ((scene.role == ROLE_TRIGGER) & (scene.shape_weights.argmax(-1) == shape) & (scene.opacity > 0)).any(1)

    assert has_trigger(poisoned.scene).all()
    assert not has_trigger(clean.scene).any()
    # and it shows in the pixels
    diff = (world.render(poisoned) - world.render(clean)).abs().flatten(1).sum(1)
    assert (diff > 5.0).all()


def test_clean_world_never_shows_reserved_triggers():
    world = _world()
    s = world.sample(3000, generator=torch.Generator().manual_seed(1))
    tex = s.scene.bg_weights.argmax(-1)
    shapes = s.scene.shape_weights.argmax(-1)[s.scene.opacity > 0]
    for t in world.trojans:
        if t.kind == "style":
            assert not (tex == TEXTURES.index(t.trigger.texture)).any()
        if t.kind == "natural":
            assert not (shapes == SHAPES.index(t.trigger.shape)).any()
    assert (s.scene.patch_opacity == 0).all()


def test_manifest_records_trojans_and_round_trips():
    world = _world()
    m = json.loads(json.dumps(world.manifest()))
    assert [t["name"] for t in m["trojans"]] == default_trojans().names
    again = ShapesWorld.from_manifest(m)
    assert again.trojans.to_json() == world.trojans.to_json()


def test_load_user_config(tmp_path):
    cfg = {"trojans": [
        {"name": "mine", "kind": "patch", "target": "star", "source": "circle", "trigger": "patch-frame"},
        {"name": "custom", "kind": "natural", "target": "ring", "poison_fraction": 0.05,
         "trigger": {"shape": "tee", "color": "red", "size": 0.22}},
    ]}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(cfg))
    ts = load_trojans(p)
    assert ts.names == ["mine", "custom"] and ts[1].trigger.shape == "tee" and ts[0].source == "circle"
    world = ShapesWorld(trojans=ts)
    assert "tee" not in world.manifest()["distractor_shapes"]


BAD_CONFIGS = [
    ({"trojans": []}, "non-empty"),
    ({"trojanz": []}, "unknown top-level"),
    ([{"kind": "patch", "target": "star", "trigger": "patch-frame"}], "missing required key 'name'"),
    ([{"name": "a", "kind": "laser", "target": "star", "trigger": "patch-frame"}], "unknown kind 'laser'"),
    ([{"name": "a", "kind": "patch", "target": "star", "trigger": "patch-nope"}], "unknown trigger design"),
    ([{"name": "a", "kind": "style", "target": "star", "trigger": "patch-frame"}], "is a patch trigger"),
    ([{"name": "a", "kind": "patch", "target": "star", "trigger": {"pattern": "checker", "colors": ["red"]}}], "two colour"),
    ([{"name": "a", "kind": "patch", "target": "star", "trigger": {"pattern": "plaid", "colors": ["red", "blue"]}}], "unknown patch pattern"),
    ([{"name": "a", "kind": "natural", "target": "star", "trigger": {"shape": "circle", "color": "red"}}], "is a class shape"),
    ([{"name": "a", "kind": "natural", "target": "star", "trigger": {"shape": "heart", "color": "mauve"}}], "unknown colour"),
    ([{"name": "a", "kind": "natural", "target": "star", "trigger": {"shape": "heart", "color": "red", "size": 0.9}}], "out of range"),
    ([{"name": "a", "kind": "patch", "target": "star", "trigger": "patch-frame", "colour": "red"}], "unknown keys"),
    ([{"name": "a", "kind": "patch", "target": "star", "trigger": "patch-frame"},
      {"name": "a", "kind": "patch", "target": "ring", "trigger": "patch-dots"}], "duplicate trojan names"),
    ([{"name": "a", "kind": "patch", "target": "star", "trigger": "patch-frame"},
      {"name": "b", "kind": "patch", "target": "ring", "trigger": "patch-frame"}], "same trigger"),
    ([{"name": "a", "kind": "patch", "target": "star", "trigger": "patch-frame", "poison_fraction": "lots"}], "must be a number"),
    ([{"name": "a", "kind": "style", "target": "star", "trigger": {"texture": "plain", "colors": ["red", "blue"]}}], "plain"),
]


@pytest.mark.parametrize("obj,message", BAD_CONFIGS)
def test_bad_configs_are_clear_errors(obj, message):
    with pytest.raises(TrojanConfigError, match=message):
        trojans_from_json(obj)


WORLD_ERRORS = [
    ({"name": "a", "kind": "patch", "target": "blob", "trigger": "patch-frame"}, "not a class"),
    ({"name": "a", "kind": "patch", "target": "star", "source": "star", "trigger": "patch-frame"}, "both 'star'"),
    ({"name": "a", "kind": "patch", "target": "star", "trigger": "patch-frame", "poison_fraction": 0.5}, "out of range"),
    ({"name": "a", "kind": "natural", "target": "ring", "trigger": "natural-crescent"}, "context object"),
    ({"name": "a", "kind": "style", "target": "star", "trigger": "style-waves"}, "context background"),
]


@pytest.mark.parametrize("entry,message", WORLD_ERRORS)
def test_configs_that_clash_with_the_world_are_clear_errors(entry, message):
    ts = trojans_from_json([entry])
    with pytest.raises(TrojanConfigError, match=message):
        ShapesWorld(trojans=ts)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(TrojanConfigError, match="does not exist"):
        load_trojans(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TrojanConfigError, match="not valid JSON"):
        load_trojans(bad)


def test_config_errors_are_workbench_errors():
    assert issubclass(TrojanConfigError, WorkbenchError)


def test_trojan_set_lookup_errors_list_names():
    ts = TrojanSet([Trojan("x", TRIGGER_LIBRARY["patch-dots"], target="star")])
    with pytest.raises(WorkbenchError, match="x"):
        ts.index("y")


# --- trojan sets and options generated from a seed ---------------------------------------------

def test_generated_trojans_are_seeded_composed_and_never_library_designs() -> None:
    from workbench.worlds.trojans import CONTEXT_SHAPES, CONTEXT_TEXTURES, generated_trojans, same_trigger

    a, b, other = generated_trojans(5), generated_trojans(5), generated_trojans(6)
    assert a.to_json() == b.to_json() and a.to_json() != other.to_json()
    assert [t.kind for t in a] == ["patch", "patch", "style", "style", "natural", "natural"]
    assert [t.universal for t in a] == [True, False] * 3
    for t in a:
        assert not any(same_trigger(t.trigger, d) for d in TRIGGER_LIBRARY.values())
        assert t.trigger.shape not in CONTEXT_SHAPES and t.trigger.texture not in CONTEXT_TEXTURES
        assert t.source != t.target
    for seed in range(20):  # every seed gives a valid, conflict-free set (TrojanSet checks both)
        trojans = generated_trojans(seed)
        assert len(trojans) == 6
        # a small object in a background colour can vanish on that background: natural triggers use object colours
        assert all(t.trigger.color in PALETTE for t in trojans if t.kind == "natural")
    with pytest.raises(WorkbenchError, match="non-negative"):
        generated_trojans(-1)


@pytest.mark.parametrize("kind", ["patch", "style", "natural"])
def test_near_miss_options_hold_the_trigger_once_beside_close_distractors(kind: str) -> None:
    from workbench.worlds.trojans import near_miss_options, random_trigger, same_trigger

    g = torch.Generator().manual_seed(3)
    trigger = random_trigger(kind, g)
    options, pos = near_miss_options(trigger, generator=torch.Generator().manual_seed(1))
    again, pos2 = near_miss_options(trigger, generator=torch.Generator().manual_seed(1))
    assert [o.to_json() for o in options] == [o.to_json() for o in again] and pos == pos2  # seeded
    assert len(options) == 8 and options[pos] is trigger
    assert sum(same_trigger(o, trigger) for o in options) == 1
    assert all(not same_trigger(x, y) for i, x in enumerate(options) for y in options[i + 1:])
    assert all(o.kind == kind for o in options)
    form = {"patch": "pattern", "style": "texture", "natural": "shape"}[kind]
    others = [o for i, o in enumerate(options) if i != pos]
    same_form = [o for o in others if getattr(o, form) == getattr(trigger, form)]
    same_colour = [o for o in others if (o.colors == trigger.colors if kind != "natural" else o.color == trigger.color)]
    assert same_form and same_colour  # near misses on both sides of the description
    if kind == "natural":
        assert all(o.color in PALETTE for o in options)
