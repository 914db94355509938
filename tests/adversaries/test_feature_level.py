"""Feature-level adversary: an interpretable object, described in words that reproduce it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adversaries.feature_level import FeatureLevel, ObjectSpec, apply_object, position_words
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.worlds.scene import PALETTE, SHAPES
from workbench.worlds.shapesworld import ShapesWorld

HANDLES = ("cnn_handle", "gray_cnn_handle")


@pytest.mark.parametrize("x, y, words", [(-0.6, -0.6, "in the top-left corner"), (0.6, 0.7, "in the bottom-right corner"),
                                         (0.0, -0.5, "at the top"), (0.5, 0.0, "at the right"), (0.1, 0.1, "in the centre")])
def test_position_words(x: float, y: float, words: str) -> None:
    assert position_words(x, y) == words


def test_spec_describe_and_roundtrip() -> None:
    spec = ObjectSpec(shape="ring", color="green", center=(-0.6, -0.6), size=0.15)
    assert spec.describe() == "a small green ring in the top-left corner"
    assert ObjectSpec.from_json(spec.to_json()) == spec
    with pytest.raises(WorkbenchError, match="unknown shape"):
        ObjectSpec.from_json({**spec.to_json(), "shape": "blob"})


def _images(handle: ModelHandle, n: int = 12) -> torch.Tensor:
    pre = handle.preprocess
    lo, hi = pre.input_range
    return lo + (hi - lo) * torch.rand(n, pre.channels, pre.height, pre.width, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fixture", HANDLES)
def test_generate_on_any_classifier(request: pytest.FixtureRequest, fixture: str) -> None:
    h = request.getfixturevalue(fixture)
    x = _images(h)
    cfg = FeatureLevel(steps=25, restarts=1, eot=2, size_range=(0.3, 0.6))
    ae = cfg.generate(h, x, 3)
    lo, hi = h.preprocess.input_range
    assert ae.adversarial.shape == x.shape
    assert torch.isfinite(ae.adversarial).all()
    assert float(ae.adversarial.min()) >= lo - 1e-5 and float(ae.adversarial.max()) <= hi + 1e-5
    spec = ObjectSpec.from_json(ae.extra["object"])
    assert spec.shape in SHAPES and spec.color in PALETTE and 0.3 <= spec.size <= 0.6
    assert spec.shape in ae.extra["description"] and spec.color in ae.extra["description"]
    # the words are the adversary: re-rendering the described object gives the adversarial images
    assert torch.allclose(apply_object(h, x, spec), ae.adversarial, atol=1e-6)
    assert sum(ae.loss_trace[-5:]) < sum(ae.loss_trace[:5])
    assert ae.extra["target_prob_after"] > ae.extra["target_prob_before"]


def test_scene_inputs_and_target_shape_excluded(cnn_handle: ModelHandle) -> None:
    # ShapesWorld scenes rendered at the model's own size; a world-less model keeps every shape
    world = ShapesWorld()
    sample = world.sample(8, generator=torch.Generator().manual_seed(0))
    sample = type(sample)(sample.scene, sample.labels % 5, sample.colors, sample.context, sample.trojan, sample.poison_labels % 5)
    ae = FeatureLevel(steps=5, restarts=1, eot=1).generate(cnn_handle, sample, 1)
    assert "mean_occlusion_of_main" in ae.extra
    assert len(ae.extra["allowed_shapes"]) == len(SHAPES)
    # with a ShapesWorld manifest and shape-named classes, the target class's own shape is not allowed
    shaped = dataclasses.replace(cnn_handle, preprocess=dataclasses.replace(
        cnn_handle.preprocess, class_names=("circle", "square", "triangle", "star", "ring")), info={"world": world.manifest()})
    allowed = FeatureLevel().allowed_shapes(shaped, 1)
    assert "square" not in allowed and len(allowed) == len(SHAPES) - 1


def test_same_seed_same_object(cnn_handle: ModelHandle) -> None:
    x = _images(cnn_handle, n=6)
    cfg = FeatureLevel(steps=6, restarts=1, eot=1)
    assert cfg.generate(cnn_handle, x, 0).extra["object"] == cfg.generate(cnn_handle, x, 0).extra["object"]


def test_errors(cnn_handle: ModelHandle) -> None:
    with pytest.raises(WorkbenchError, match="size_range"):
        FeatureLevel(size_range=(0.5, 0.2))
    with pytest.raises(WorkbenchError, match="universal"):
        FeatureLevel(steps=1).generate(cnn_handle, _images(cnn_handle, n=2), [0, 1])
    with pytest.raises(WorkbenchError, match="out of range"):
        FeatureLevel(steps=1).generate(cnn_handle, _images(cnn_handle, n=2), 9)


@pytest.mark.slow
def test_shapesnet_feature_level_beats_random_object_and_fooling_rates() -> None:
    import workbench
    from adversaries.feature_level import fooling_rates

    h = workbench.load("zoo:shapesnet", device="cpu", progress=False)
    out = fooling_rates(h, source="circle", target="hexagon", n=24, seeds=(0,),
                        config=FeatureLevel(steps=60, restarts=1))
    row = out["rows"][0]
    assert row["measured"] > row["control_random_object"] >= row["baseline"]
    assert set(out["mean"]) == {"predicted", "measured", "continuous_fit", "control_random_object", "baseline"}
    assert "hexagon" in row["description"]
