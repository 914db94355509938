"""Scene-vocabulary search: findings in words, scored on the same placements, checked on held-back scenes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from adversaries.scene_search import FACETS, SceneSearch, all_candidates, design_of, neighbours, scenes_not_of
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.worlds.scene import CLASS_SHAPES
from workbench.worlds.shapesworld import ShapesWorld
from workbench.worlds.trojans import default_trojans

COLORS = ("red", "navy", "lime")


@pytest.fixture(scope="module")
def shapesnet() -> ModelHandle:
    import workbench

    return workbench.load("zoo:shapesnet", device="cpu", progress=False)


def test_candidates_cover_the_vocabulary_and_neighbours_change_one_word() -> None:
    style = all_candidates("style", COLORS)
    assert len(style) == 8 * 3 * 2  # 8 textures (not plain) x ordered pairs of different colours
    assert all(c[1] != c[2] and c[0] != "plain" for c in style)
    natural = all_candidates("natural", COLORS)
    assert natural and not any(c[0] in CLASS_SHAPES for c in natural)
    for facet in FACETS:
        c = all_candidates(facet, COLORS)[0]
        nb = neighbours(facet, c, COLORS)
        assert nb and all(sum(a != b for a, b in zip(c, d)) == 1 for d in nb)
        assert all(d in all_candidates(facet, COLORS) for d in nb)
        design_of(facet, c, patch_size=0.2, object_size=0.25).check()  # every candidate is a valid design


def test_config_errors() -> None:
    with pytest.raises(WorkbenchError, match="facets"):
        SceneSearch(facets=("texture",))
    with pytest.raises(WorkbenchError, match="unknown colour|colour"):
        SceneSearch(colors=("red", "mauve"))
    with pytest.raises(WorkbenchError, match="two different"):
        SceneSearch(colors=("red", "red"))
    with pytest.raises(WorkbenchError, match="patch_size"):
        SceneSearch(patch_size=0.9)
    with pytest.raises(WorkbenchError, match="check_fraction"):
        SceneSearch(check_fraction=1.0)


def _small(**kw: object) -> SceneSearch:
    return SceneSearch(**{"colors": COLORS, "n_random": 6, "n_starts": 1, "max_rounds": 1, "top_k": 2, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("fixture", ("cnn_handle", "gray_cnn_handle"))
def test_runs_on_any_image_classifier(request: pytest.FixtureRequest, fixture: str) -> None:
    h = request.getfixturevalue(fixture)
    k = len(h.preprocess.class_names)
    s = ShapesWorld().sample(6, generator=torch.Generator().manual_seed(0))
    s = dataclasses.replace(s, labels=s.labels % k)
    ae = _small(facets=("style", "patch")).generate(h, s, 1)
    pre = h.preprocess
    assert ae.adversarial.shape == (6, pre.channels, pre.height, pre.width)
    lo, hi = pre.input_range
    assert float(ae.adversarial.min()) >= lo - 1e-5 and float(ae.adversarial.max()) <= hi + 1e-5
    found = ae.extra["findings"]
    assert len(found) == 4 and {f["facet"] for f in found} == {"style", "patch"}
    assert [f["log_gain"] for f in found] == sorted((f["log_gain"] for f in found), reverse=True)
    assert ae.extra["finding_images"].shape == (4, 3, 48, 48)


def test_bad_inputs(cnn_handle: ModelHandle) -> None:
    with pytest.raises(WorkbenchError, match="ShapesWorld scenes"):
        _small().generate(cnn_handle, torch.rand(4, 3, 16, 16), 0)
    with pytest.raises(WorkbenchError, match="targeted"):
        _small().generate(cnn_handle, None, None)
    with pytest.raises(WorkbenchError, match="no ShapesWorld"):
        _small().generate(cnn_handle, None, 0)
    s = ShapesWorld().sample(4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(WorkbenchError, match="labels reach"):
        _small().generate(cnn_handle, dataclasses.replace(s, labels=torch.full_like(s.labels, 7)), 0)


def test_finds_the_implanted_style_trigger_and_beats_random_words(shapesnet: ModelHandle) -> None:
    """style-star: a lime/navy zigzag background turns stars into crosses. Searching the style
    words on star scenes must put the zigzag texture first, far above a random background."""
    from workbench.zoo.shapesnet import world_of

    trojan = next(t for t in default_trojans() if t.name == "style-star")
    world = world_of(shapesnet)
    tgt = world.class_index(trojan.target)
    scenes = scenes_not_of(shapesnet, world, tgt, 16, seed=1, classes=[trojan.source])
    cfg = SceneSearch(facets=("style",), n_random=40, n_starts=2, max_rounds=2, top_k=2, seed=0)
    ae = cfg.generate(shapesnet, scenes, trojan.target)
    top = ae.extra["findings"][0]
    assert top["words"][0] == "zigzag"
    assert top["gain"] > 0.5 > ae.extra["control_random_word"]["style"]
    again = cfg.generate(shapesnet, scenes, trojan.target)
    assert again.extra["findings"] == ae.extra["findings"]  # same seed, same findings
