"""Trojan rediscovery: the 8-way multiple choice, the judge's colour model, the run on ShapesNet."""

from __future__ import annotations

import pytest
import torch

from workbench import rediscovery as rd
from workbench.errors import WorkbenchError
from workbench.worlds.shapesworld import BACKGROUND_PALETTE, PALETTE
from workbench.worlds.trojans import TRIGGER_LIBRARY, Trojan, TrojanSet, default_trojans, trojans_from_json


@pytest.fixture(scope="module")
def shapesnet():
    import workbench

    return workbench.load("zoo:shapesnet", device="cpu", progress=False)


def test_color_content_is_a_histogram_over_the_palette():
    names = list(PALETTE) + list(BACKGROUND_PALETTE)
    colors = [PALETTE["pink"], BACKGROUND_PALETTE["teal"]]
    imgs = torch.stack([torch.tensor(c).view(3, 1, 1).expand(3, 8, 8) for c in colors])
    h = rd.color_content(imgs)
    torch.testing.assert_close(h.sum(1), torch.ones(2))
    assert h[0].argmax() == names.index("pink") and h[1].argmax() == names.index("teal")
    w = torch.zeros(2, 8, 8)
    w[:, :2] = 1
    torch.testing.assert_close(rd.color_content(imgs, weights=w), h)


@pytest.mark.parametrize("name", list(TRIGGER_LIBRARY))
def test_an_exact_picture_of_the_trigger_is_recognized(name):
    design = TRIGGER_LIBRARY[name]
    trojan = Trojan("t", design, target="circle")
    views = design.example(image_size=48)[None]
    mc = rd.multiple_choice(trojan, views, None, seed=3)
    assert len(mc["options"]) == 8 and len(set(mc["options"])) == 8
    assert mc["options"][mc["true_index"]] == name
    assert all(TRIGGER_LIBRARY[o].kind == design.kind for o in mc["options"])  # same-kind distractors
    assert mc["score"] == 1.0 and mc["consensus_correct"]


def test_unrelated_views_score_low_and_empty_views_score_zero():
    trojan = default_trojans()[4]  # the pink heart
    grey = torch.full((4, 3, 48, 48), 0.45)
    green = grey.clone()
    green[:, 1] = 0.9
    assert rd.multiple_choice(trojan, green, None)["score"] == 0.0
    assert rd.multiple_choice(trojan, torch.zeros(0, 3, 48, 48), None)["score"] == 0.0


def test_distractors_are_the_most_similar_designs():
    trojan = default_trojans()[0]  # yellow/blue checker patch
    views = TRIGGER_LIBRARY["patch-frame"].example()[None]  # yellow/red: an option must be chosen by similarity
    mc = rd.multiple_choice(trojan, views, None, n_options=3)
    assert len(mc["options"]) == 3 and "patch-frame" in mc["options"]


def test_rediscover_tiny_run_and_table(shapesnet, tmp_path):
    one_per_kind = TrojanSet([default_trojans()[i] for i in (0, 2, 4)])
    res = rd.rediscover(shapesnet, trojans=one_per_kind, methods=["featvis-logit"], budget="tiny", judge=None,
                        progress=False, views_dir=tmp_path / "views")
    assert len(res.rows) == 3 and {r["kind"] for r in res.rows} == {"patch", "style", "natural"}
    assert 0.0 <= res.mean_score <= 1.0
    doc = res.to_json()
    assert doc["chance"] == 0.125 and doc["human_best_published"] == 0.47
    assert {"name", "kind", "method", "score"} <= set(doc["per_trojan"][0])
    assert set(doc["per_kind"]) == {"patch", "style", "natural"}
    assert "featvis-logit" in res.table() and "chance 0.125" in res.table()
    out = res.save(tmp_path / "rd")
    assert (out / "rediscovery.json").is_file() and (out / "rediscovery.txt").is_file()
    assert len(list((tmp_path / "views").glob("*.png"))) == 3
    again = rd.rescore(tmp_path / "views" / "views.safetensors", one_per_kind, None)
    assert {r["name"]: r["score"] for r in again.rows} == {r["name"]: r["score"] for r in res.rows}  # same views, same answers


def test_held_out_config_must_be_implanted(shapesnet):
    subset = TrojanSet([default_trojans()[4], default_trojans()[5]])
    res = rd.rediscover(shapesnet, trojans=subset, methods=["featvis-logit"], budget="tiny", judge=None, progress=False)
    assert [r["name"] for r in res.rows] == ["natural-universal", "natural-circle"]
    other = trojans_from_json([{"name": "new", "kind": "natural", "target": "ring", "trigger": "natural-arrow"}])
    with pytest.raises(WorkbenchError, match="--train"):
        rd.rediscover(shapesnet, trojans=other, methods=["featvis-logit"], budget="tiny", judge=None, progress=False)
    with pytest.raises(WorkbenchError, match="unknown rediscovery methods"):
        rd.rediscover(shapesnet, methods=["nope"], judge=None, progress=False)


def test_methods_table_names_every_method():
    assert {"featvis-logit", "copy-paste", "feature-level", "natural", "adversarial-patch"} <= set(rd.METHODS)


@pytest.mark.slow
def test_judge_names_canonical_things():
    from workbench.judge import load_judge
    from workbench.worlds.trojans import trigger_candidates

    judge = load_judge(progress=False)
    correct = 0
    for kind in ("patch", "style"):
        pool = trigger_candidates(kind)
        probs = judge.embed(torch.stack([d.example() for d in pool]))
        idx = torch.tensor([judge.index(rd._attribute_of(d)) for d in pool])
        correct += int((probs[:, idx].argmax(1) == torch.arange(len(pool))).sum())
    assert correct >= 10  # of 16 canonical patch/style pictures (chance: 2)
