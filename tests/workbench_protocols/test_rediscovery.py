"""Trojan rediscovery: the 8-way multiple choice, the judge's colour model, the run on ShapesNet."""

from __future__ import annotations

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.worlds.scene import BACKGROUND_PALETTE, PALETTE
from workbench.worlds.trojans import TRIGGER_LIBRARY, Trojan, TrojanSet, default_trojans, trojans_from_json
from workbench_protocols import rediscovery as rd


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


def test_weighted_share_never_exceeds_one():
    # Weights whose float32 normalization sums to 1 + 1.2e-7: a share summed from such weights was
    # once reported as 1.0000001 when every view voted right.
    g = torch.Generator().manual_seed(0)
    draws = (torch.rand(3, generator=g) for _ in range(1000))
    weights = next(w for w in draws if float((w / w.sum()).sum()) > 1.0)
    design = TRIGGER_LIBRARY["patch-checker"]
    trojan = Trojan("t", design, target="circle")
    views = design.example(image_size=48)[None].repeat(3, 1, 1, 1)
    mc = rd.multiple_choice(trojan, views, None, seed=3, weights=weights)
    assert mc["score"] == 1.0


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
    assert doc["per_method_one_answer"]["featvis-logit"] == pytest.approx(
        sum(r["consensus_correct"] for r in res.rows) / 3, abs=1e-4)
    assert "one answer" in res.table()
    assert "featvis-logit" in res.table() and "chance 0.125" in res.table()
    # the scores are read beside the model's accuracy and each trojan's attack success (zoo record)
    assert doc["model_accuracy"] == shapesnet.info["accuracy"] and doc["model_quality"]["source"] == "training record"
    record = {t["name"]: t["attack_success"] for t in shapesnet.info["trojans"]}
    assert all(row["attack_success"] == record[row["name"]] for row in doc["per_trojan"])
    assert f"clean accuracy {shapesnet.info['accuracy']:.3f}" in res.table() and "attack" in res.table().splitlines()[1]
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


def test_vote_weights_are_a_distribution():
    torch.testing.assert_close(rd.vote_weights(None, 4), torch.full((4,), 0.25))
    torch.testing.assert_close(rd.vote_weights(torch.tensor([0.0, -1.0, float("nan")]), 3), torch.full((3,), 1 / 3))
    torch.testing.assert_close(rd.vote_weights(torch.tensor([3.0, 1.0, -2.0]), 3), torch.tensor([0.75, 0.25, 0.0]))
    with pytest.raises(WorkbenchError, match="one weight per view"):
        rd.vote_weights(torch.ones(2), 3)


@pytest.mark.parametrize("gains", [[0.1, 0.3, 0.2, 0.3], [0.0, 0.0], [0.9]])
def test_evidence_weights_follow_the_measured_gain(gains):
    w = rd.evidence_weights(torch.tensor(gains))
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    g = torch.tensor(gains)
    for i in range(len(gains)):
        for j in range(len(gains)):
            if g[i] > g[j]:
                assert w[i] > w[j]
            if g[i] == g[j]:
                torch.testing.assert_close(w[i], w[j])
    sharper = rd.evidence_weights(g, temperature=0.01)
    assert float(sharper.max()) >= float(w.max()) - 1e-6
    with pytest.raises(WorkbenchError):
        rd.evidence_weights(g, temperature=0.0)


def test_weighted_votes_follow_the_evidence():
    trojan = default_trojans()[4]  # the pink heart
    right = TRIGGER_LIBRARY["natural-heart"].example(image_size=48)
    wrong = TRIGGER_LIBRARY["natural-tee"].example(image_size=48)
    views = torch.stack([right, wrong, wrong, wrong])
    plain = rd.multiple_choice(trojan, views, None, seed=1)
    assert plain["score"] == pytest.approx(0.25) and plain["weights"] is None
    evidence = torch.tensor([0.9, 0.1, 0.1, 0.1])
    weighted = rd.multiple_choice(trojan, views, None, seed=1, weights=rd.evidence_weights(evidence))
    assert weighted["score"] > 0.9 and weighted["consensus_correct"] and not plain["consensus_correct"]
    assert weighted["options"] == plain["options"]  # weights change the answer, never the question
    flat = rd.multiple_choice(trojan, views, None, seed=1, weights=torch.ones(4))
    assert flat["score"] == pytest.approx(plain["score"])


def test_synthesis_weights_follow_the_facets():
    syn = rd.Synthesis(torch.rand(3, 3, 8, 8), facets=["natural", "style", "any"], weights=torch.tensor([0.5, 0.2, 0.3]))
    assert syn.for_kind("style").shape[0] == 2
    torch.testing.assert_close(syn.weights_for_kind("style"), torch.tensor([0.2, 0.3]))
    torch.testing.assert_close(syn.weights_for_kind("patch"), torch.tensor([0.3]))  # "any" answers every kind
    two = rd.Synthesis(torch.rand(2, 3, 8, 8), facets=["natural", "natural"], weights=torch.tensor([0.6, 0.4]))
    torch.testing.assert_close(two.weights_for_kind("style"), two.weights)  # no view of that facet: all views
    assert rd.Synthesis(torch.rand(2, 3, 8, 8)).weights_for_kind("style") is None


def test_natural_search_views_carry_their_evidence(shapesnet):
    trojan = default_trojans()[4]
    world = __import__("workbench.zoo.shapesnet", fromlist=["world_of"]).world_of(shapesnet)
    a = rd.natural_search(shapesnet, trojan, world, budget="tiny", seed=3)
    b = rd.natural_search(shapesnet, trojan, world, budget="tiny", seed=3)
    assert a.views.shape[0] == a.weights.shape[0] == len(a.notes["views"]) >= 2
    torch.testing.assert_close(a.weights.sum(), torch.tensor(1.0))
    gains = torch.tensor([v["gain"] for v in a.notes["views"]])
    assert int(a.weights.argmax()) == int(gains.argmax())
    assert torch.equal(a.views, b.views) and torch.equal(a.weights, b.weights)  # same seed, same views
    assert float(a.views.min()) >= 0 and float(a.views.max()) <= 1


def test_scene_search_views_are_findings_with_facets_and_evidence(shapesnet):
    trojan = default_trojans()[3]  # style-star: lime/navy zigzag background, star -> cross
    world = __import__("workbench.zoo.shapesnet", fromlist=["world_of"]).world_of(shapesnet)
    syn = rd.scene_vocabulary_search(shapesnet, trojan, world, budget="tiny", seed=0)
    assert syn.facets is not None and set(syn.facets) == {"style", "patch", "natural"}
    assert syn.views.shape[0] == syn.weights.shape[0] == len(syn.notes["views"]) == len(syn.facets)
    torch.testing.assert_close(syn.weights.sum(), torch.tensor(1.0))
    gains = torch.tensor([v["gain"] for v in syn.notes["views"]])
    assert int(syn.weights.argmax()) == int(gains.argmax())
    # a style question is judged on the background findings only
    assert syn.for_kind("style").shape[0] == syn.facets.count("style")
    assert "scene-search" in rd.METHODS


def test_combined_choice_uses_each_methods_weights():
    trojan = default_trojans()[4]  # the pink heart
    right = TRIGGER_LIBRARY["natural-heart"].example(image_size=48)
    wrong = TRIGGER_LIBRARY["natural-tee"].example(image_size=48)
    method = torch.stack([right, wrong, wrong, wrong])
    assert rd.combined_choice(trojan, [method], None, seed=2)["score"] == 0.0
    favour = rd.evidence_weights(torch.tensor([0.9, 0.1, 0.1, 0.1]))
    assert rd.combined_choice(trojan, [method], None, seed=2, weights=[favour])["score"] == 1.0
    assert rd.combined_choice(trojan, [method, wrong[None]], None, seed=2, weights=[favour, None])["score"] in (0.0, 1.0)
    with pytest.raises(WorkbenchError, match="one \\(or None\\) per method"):
        rd.combined_choice(trojan, [method], None, weights=[None, None])


def test_rescore_reads_the_saved_weights(tmp_path):
    from workbench.storage import save_safetensors

    trojan = default_trojans()[4]
    right = TRIGGER_LIBRARY["natural-heart"].example(image_size=48)
    wrong = TRIGGER_LIBRARY["natural-tee"].example(image_size=48)
    views = torch.stack([right, wrong, wrong, wrong]).contiguous()
    favour = rd.evidence_weights(torch.tensor([0.9, 0.1, 0.1, 0.1])).contiguous()
    save_safetensors(tmp_path / "views.safetensors", {f"{trojan.name}|natural": views,
                                                      f"{trojan.name}|natural|weights": favour}, {"what": "test"})
    res = rd.rescore(tmp_path / "views.safetensors", TrojanSet([trojan]), None)
    assert [r["method"] for r in res.rows] == ["natural"]  # the weights are not a method
    direct = rd.multiple_choice(trojan, views, None, weights=favour)
    assert res.rows[0]["score"] == pytest.approx(direct["score"]) and res.rows[0]["score"] > 0.9
    assert res.combined["per_trojan"][trojan.name] == 1.0


def test_copy_paste_search_weights_views_by_calibration_success(shapesnet):
    from workbench.zoo.shapesnet import world_of

    trojan = default_trojans()[0]
    syn = rd.copy_paste_search(shapesnet, trojan, world_of(shapesnet), budget="tiny", seed=0)
    assert syn.weights is not None and syn.weights.shape[0] == syn.views.shape[0] == len(syn.facets)
    torch.testing.assert_close(syn.weights.sum(), torch.tensor(1.0))
    success = torch.tensor(syn.notes["calibration_success"])
    assert int(syn.weights.argmax()) == int(success.argmax()) or float(success.max() - success.min()) < 1e-6


def test_model_quality_is_measured_when_the_model_has_no_record(shapesnet):
    import dataclasses

    bare = dataclasses.replace(shapesnet, info={"world": shapesnet.info["world"]})
    subset = TrojanSet([default_trojans()[0], default_trojans()[4]])
    q = rd.model_quality(bare, subset, n=64, n_trojan=32)
    assert q["source"].startswith("measured") and 0.0 <= q["accuracy"] <= 1.0
    assert set(q["attack_success"]) == {t.name for t in subset}
    assert rd.model_quality(shapesnet, subset)["source"] == "training record"


def test_model_for_trojans_uses_the_zoo_recipe_unless_asked_and_keeps_a_record(tmp_path, monkeypatch):
    import json

    from workbench import load
    from workbench.worlds.shapesworld import WorldConfig
    from workbench.zoo import shapesnet as sn

    real_train = sn.train
    recipes = []

    def tiny(path, *, seed, progress, trojans, config):
        recipes.append((config.n_train, config.epochs))
        small = sn.TrainConfig(n_train=256, epochs=1, batch_size=64, n_eval=64, n_eval_trojan=16,
                               world=WorldConfig(image_size=32))
        return real_train(path, seed=seed, progress=False, trojans=trojans, config=small)

    monkeypatch.setattr(sn, "train", tiny)
    held = trojans_from_json([{"name": "new", "kind": "natural", "target": "ring", "trigger": "natural-arrow"}])
    zoo_model = rd.model_for_trojans(held, cache=tmp_path, progress=False)
    quick_model = rd.model_for_trojans(held, cache=tmp_path, quick=True, progress=False)
    assert recipes == [(sn.TrainConfig().n_train, sn.TrainConfig().epochs), rd.QUICK_TRAIN]
    assert zoo_model.path != quick_model.path
    assert zoo_model.info["recipe"] == "zoo" and quick_model.info["recipe"] == "quick"
    record = json.loads((zoo_model.path / "zoo_info.json").read_text())
    assert record["recipe"] == "zoo" and [t["name"] for t in record["trojans"]] == ["new"]
    again = load(str(zoo_model.path), device="cpu", progress=False)  # the folder carries world and record
    assert again.info["recipe"] == "zoo" and rd.implanted(again, held) is held
    q = rd.model_quality(again, held)
    assert q["source"] == "training record" and q["recipe"] == "zoo"
    assert q["attack_success"] == {"new": record["trojans"][0]["attack_success"]}


def test_cli_trains_with_the_zoo_recipe_by_default(tmp_path, monkeypatch, capsys):
    import json

    from workbench_cli.main import main

    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps({"trojans": [{"name": "x", "kind": "natural", "target": "ring", "trigger": "natural-arrow"}]}))
    asked = []

    def fake(trojans, **kwargs):
        asked.append(kwargs["quick"])
        raise WorkbenchError("stop here")

    monkeypatch.setattr(rd, "model_for_trojans", fake)
    base = ["rediscover", "zoo:shapesnet", "--trojans", str(cfg), "--out", str(tmp_path / "r"), "--device", "cpu"]
    assert main([*base, "--train"]) == 2 and main([*base, "--train", "--quick-train"]) == 2
    assert asked == [False, True]
    assert main([*base, "--quick-train"]) == 2 and "--quick-train applies with --train" in capsys.readouterr().err


def test_given_options_are_asked_as_they_are():
    from workbench.worlds.trojans import generated_trojans, near_miss_options

    trojan = generated_trojans(4)[0]  # a patch trigger composed from seed 4: no library design
    question = near_miss_options(trojan.trigger, generator=torch.Generator().manual_seed(11))
    designs, pos = question
    right = trojan.trigger.example(image_size=48)[None]
    mc = rd.multiple_choice(trojan, right, None, options=question)
    assert mc["options"] == [d.name for d in designs] and mc["true_index"] == pos and mc["score"] == 1.0
    near = designs[(pos + 1) % len(designs)].example(image_size=48)[None]
    assert rd.multiple_choice(trojan, near, None, options=question)["score"] == 0.0
    empty = rd.multiple_choice(trojan, torch.zeros(0, 3, 48, 48), None, options=question)
    assert empty["score"] == 0.0 and empty["true_index"] == pos  # the same question, unanswered
    combined = rd.combined_choice(trojan, [right, near], None, options=question)
    assert combined["options"] == mc["options"] and combined["true_index"] == pos
    wrong_pos = (designs, (pos + 1) % len(designs))
    with pytest.raises(WorkbenchError, match="is not its trigger"):
        rd.multiple_choice(trojan, right, None, options=wrong_pos)
    with pytest.raises(WorkbenchError, match="more than once"):
        rd.multiple_choice(trojan, right, None, options=([trojan.trigger, *designs], pos + 1))


def test_library_options_are_unchanged_without_given_ones():
    trojan = default_trojans()[0]
    views = TRIGGER_LIBRARY["patch-frame"].example()[None]
    assert rd.multiple_choice(trojan, views, None, seed=5) == rd.multiple_choice(trojan, views, None, seed=5, options=None)
    assert all(o in TRIGGER_LIBRARY for o in rd.multiple_choice(trojan, views, None, seed=5)["options"])
