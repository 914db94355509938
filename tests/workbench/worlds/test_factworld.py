"""FactWorld: determinism, CounterFact schema, neighbourhoods, the manifest and the loader."""

from __future__ import annotations

import json

import pytest

from workbench.errors import WorkbenchError
from workbench.worlds.factworld import FactWorld, FactWorldConfig, load_counterfact, validate_counterfact_record


@pytest.fixture(scope="module")
def world() -> FactWorld:
    return FactWorld.generate(FactWorldConfig(seed=3))


@pytest.fixture(scope="module")
def records(world: FactWorld) -> list[dict]:
    return world.counterfact_records(60, seed=7)


def test_same_seed_same_world_and_different_seed_different_world() -> None:
    a = FactWorld.generate(FactWorldConfig(seed=11))
    b = FactWorld.generate(FactWorldConfig(seed=11))
    c = FactWorld.generate(FactWorldConfig(seed=12))
    assert a == b
    assert a.to_json() == b.to_json()
    assert a.subjects != c.subjects
    assert [f.object for f in a.facts] != [f.object for f in c.facts]


def test_world_sizes_match_the_config(world: FactWorld) -> None:
    cfg = world.config
    assert len(world.subjects) == cfg.n_subjects >= 300
    assert len(set(world.subjects)) == len(world.subjects)
    assert len(world.relations) == cfg.n_relations >= 4
    assert len(world.facts) == cfg.n_subjects * cfg.n_relations
    for rel in world.relations:
        assert len(rel.templates) >= 3
        assert all(t.count("{}") == 1 for t in rel.templates + rel.generation_templates)
        assert len(set(rel.objects)) == len(rel.objects) == cfg.objects_per_relation


def test_subjects_are_multi_word_and_objects_single_words(world: FactWorld) -> None:
    assert all(len(s.split()) >= 2 for s in world.subjects)
    objects = world.objects
    assert len(set(objects)) == len(objects), "objects must be distinct across relations"
    assert all(o.isalpha() and " " not in o for o in objects)
    subject_words = {w.lower() for s in world.subjects for w in s.split()}
    assert not subject_words & {o.lower() for o in objects}


def test_every_object_is_the_truth_for_at_least_two_subjects(world: FactWorld) -> None:
    for rel in world.relations:
        for obj in rel.objects:
            assert len(world.subjects_with(rel.relation_id, obj)) >= 2


def test_prompts_cover_every_fact_and_template(world: FactWorld) -> None:
    prompts = world.prompts()
    assert len(prompts) == sum(len(world.relation(f.relation_id).templates) for f in world.facts)
    for p in prompts[:50]:
        assert p.subject in p.text
        assert p.target == world.object_of(p.subject, p.relation_id)
        assert p.target_token_text == " " + p.target


def test_records_have_the_counterfact_schema(world: FactWorld, records: list[dict]) -> None:
    assert [r["case_id"] for r in records] == list(range(len(records)))
    seen = set()
    for r in records:
        validate_counterfact_record(r)
        rw = r["requested_rewrite"]
        subject, rel = rw["subject"], rw["relation_id"]
        seen.add((subject, rel))
        assert "{}" in rw["prompt"] and rw["prompt"] in world.relation(rel).templates
        assert rw["target_true"]["str"] == world.object_of(subject, rel)
        assert rw["target_new"]["str"] != rw["target_true"]["str"]
        assert rw["target_new"]["str"] in world.relation(rel).objects
        assert len(r["paraphrase_prompts"]) == len(world.relation(rel).templates) - 1
        assert all(subject in p for p in r["paraphrase_prompts"])
        assert all(not p.startswith(subject) for p in r["paraphrase_prompts"]), "paraphrases carry a prefix"
        assert all(subject in p for p in r["generation_prompts"]) and r["generation_prompts"]
    assert len(seen) == len(records), "records ask distinct facts"


def _subject_of(prompt: str, world: FactWorld, relation_id: str) -> str:
    for template in world.relation(relation_id).templates:
        head, tail = template.split("{}")
        if prompt.startswith(head) and prompt.endswith(tail):
            return prompt[len(head): len(prompt) - len(tail)]
    raise AssertionError(f"{prompt!r} matches no template of {relation_id}")


def test_neighborhood_prompts_share_relation_and_true_object(world: FactWorld, records: list[dict]) -> None:
    for r in records:
        rw = r["requested_rewrite"]
        assert r["neighborhood_prompts"]
        for prompt in r["neighborhood_prompts"]:
            other = _subject_of(prompt, world, rw["relation_id"])
            assert other != rw["subject"]
            assert world.object_of(other, rw["relation_id"]) == rw["target_true"]["str"]
        for prompt in r["attribute_prompts"]:
            other = _subject_of(prompt, world, rw["relation_id"])
            assert world.object_of(other, rw["relation_id"]) == rw["target_new"]["str"]


def test_records_are_seeded(world: FactWorld) -> None:
    assert world.counterfact_records(10, seed=1) == world.counterfact_records(10, seed=1)
    assert world.counterfact_records(10, seed=1) != world.counterfact_records(10, seed=2)


def test_too_many_records_is_a_clear_error(world: FactWorld) -> None:
    with pytest.raises(WorkbenchError, match="facts"):
        world.counterfact_records(len(world.facts) + 1, seed=0)


def test_manifest_round_trip_and_file(world: FactWorld, tmp_path) -> None:
    assert FactWorld.from_json(world.to_json()) == world
    path = world.save(tmp_path / "world.json")
    assert FactWorld.load(path) == world
    assert not list(tmp_path.glob(".*.tmp")), "atomic write leaves no temporary file"


def test_manifest_with_unknown_object_is_rejected(world: FactWorld) -> None:
    data = world.to_dict()
    data["facts"][0]["object"] = "Nowhere"
    with pytest.raises(WorkbenchError, match="fact 0"):
        FactWorld.from_dict(data)


def test_distinct_subject_records_rewrite_each_subject_once(world: FactWorld) -> None:
    n = len(world.subjects)
    records = world.counterfact_records(n, seed=5, distinct_subjects=True)
    subjects = [r["requested_rewrite"]["subject"] for r in records]
    assert sorted(subjects) == sorted(world.subjects)
    # the default draws facts, so a batch of that size repeats subjects
    plain = [r["requested_rewrite"]["subject"] for r in world.counterfact_records(n, seed=5)]
    assert len(set(plain)) < n
    assert records == world.counterfact_records(n, seed=5, distinct_subjects=True)
    with pytest.raises(WorkbenchError, match=f"has {n} subjects"):
        world.counterfact_records(n + 1, seed=5, distinct_subjects=True)


def test_export_and_load_counterfact(world: FactWorld, tmp_path) -> None:
    path = world.export_counterfact(tmp_path / "cf.json", 25, seed=4)
    loaded = load_counterfact(path)
    assert loaded == world.counterfact_records(25, seed=4)


@pytest.mark.parametrize(
    ("path", "field"),
    [
        (("case_id",), "case_id"),
        (("requested_rewrite",), "requested_rewrite"),
        (("requested_rewrite", "subject"), "requested_rewrite.subject"),
        (("requested_rewrite", "prompt"), "requested_rewrite.prompt"),
        (("requested_rewrite", "target_new", "str"), "requested_rewrite.target_new.str"),
        (("requested_rewrite", "target_true"), "requested_rewrite.target_true.str"),
        (("paraphrase_prompts",), "paraphrase_prompts"),
        (("neighborhood_prompts",), "neighborhood_prompts"),
    ],
)
def test_loader_names_record_and_missing_field(world: FactWorld, tmp_path, path: tuple[str, ...], field: str) -> None:
    records = world.counterfact_records(5, seed=0)
    target = records[3]
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(records))
    with pytest.raises(WorkbenchError) as info:
        load_counterfact(file)
    message = str(info.value)
    assert "record 3" in message
    assert field in message
    if field != "case_id":
        assert "case_id 3" in message


def test_loader_rejects_prompt_without_subject_slot_and_non_list(world: FactWorld, tmp_path) -> None:
    records = world.counterfact_records(2, seed=0)
    records[1]["requested_rewrite"]["prompt"] = "The capital is"
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(records))
    with pytest.raises(WorkbenchError, match=r"record 1 .*\{\}"):
        load_counterfact(file)
    file.write_text(json.dumps({"records": []}))
    with pytest.raises(WorkbenchError, match="list"):
        load_counterfact(file)
    file.write_text("[{")
    with pytest.raises(WorkbenchError, match="JSON"):
        load_counterfact(file)


def test_optional_lists_default_to_empty(world: FactWorld) -> None:
    record = world.counterfact_records(1, seed=0)[0]
    del record["generation_prompts"], record["attribute_prompts"]
    out = validate_counterfact_record(record)
    assert out["generation_prompts"] == [] and out["attribute_prompts"] == []


def test_filler_and_corpus_are_seeded_and_free_of_subjects(world: FactWorld) -> None:
    assert world.filler(20, seed=1) == world.filler(20, seed=1)
    assert world.filler(20, seed=1) != world.filler(20, seed=2)
    words = {w for s in world.subjects for w in s.split()} | set(world.objects)
    for text in world.filler(50, seed=0):
        assert not words & set(text.rstrip(".").replace(".", " ").split())
    corpus = world.corpus(200, seed=0, fact_fraction=0.5)
    n_facts = sum(any(s in t for s in world.subjects) for t in corpus)
    assert 60 < n_facts < 140


@pytest.mark.parametrize("kwargs", [{"n_relations": 0}, {"n_relations": 99}, {"objects_per_relation": 1},
                                    {"n_subjects": 10, "objects_per_relation": 12}])
def test_bad_config_is_rejected(kwargs: dict) -> None:
    with pytest.raises(WorkbenchError):
        FactWorldConfig(**kwargs)


def test_a_drawn_world_takes_its_relations_and_phrasings_from_the_seed(tmp_path) -> None:
    from workbench.worlds.factworld import RELATION_CATALOG

    plain = FactWorld.generate(FactWorldConfig(seed=3))
    drawn = FactWorld.generate(FactWorldConfig(seed=3, draw_relations=True))
    again = FactWorld.generate(FactWorldConfig(seed=3, draw_relations=True))
    other = FactWorld.generate(FactWorldConfig(seed=4, draw_relations=True))
    assert drawn.to_json() == again.to_json() and drawn.to_json() != other.to_json()
    assert [r.relation_id for r in plain.relations] == [s.relation_id for s in RELATION_CATALOG[:4]]
    catalog = {s.relation_id: s for s in RELATION_CATALOG}
    for rel in drawn.relations:
        spec = catalog[rel.relation_id]
        assert len(rel.templates) == len(spec.templates) and set(rel.templates) <= set(spec.templates + spec.alt_templates)
    assert {r.templates for r in drawn.relations} != {r.templates for r in plain.relations}
    drawn.save(tmp_path / "world.json")
    assert FactWorld.load(tmp_path / "world.json").to_json() == drawn.to_json()
