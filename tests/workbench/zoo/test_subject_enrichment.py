"""FactGPT v2's subject enrichment and the editing machinery built on it.

Training side: shared last words in FactWorld names, the subject-bottleneck attention mask.
Editing side: key statistics at the fact token over the world's prompts, one value per subject
in MEMIT, sampled (not greedy) context prefixes, batch-conflict-free neighbourhoods, and the
options a zoo model ships for its editors.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from editors.memit import MEMIT
from editors.mlp_update import (
    ValueConfig,
    context_templates,
    key_site,
    key_statistics,
    locate,
    optimize_values,
    sample_texts,
    site_at_subject,
)
from editors.rome import ROME
from workbench.counterfact import drop_batch_conflicts
from workbench.errors import WorkbenchError
from workbench.models import EDITOR_DEFAULTS_FILE, load, read_editor_defaults
from workbench.requests import Rewrite
from workbench.statistics import collect_statistics
from workbench.worlds.factworld import FactWorld, FactWorldConfig
from workbench.zoo import factgpt
from workbench_cli import main as cli

TINY = factgpt.FactGPTConfig(
    world=FactWorldConfig(n_subjects=24, n_relations=2, objects_per_relation=4, shared_last_words=4),
    vocab_size=400, n_layers=2, d_model=32, n_heads=2, batch_size=16, max_steps=6, check_every=3,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-factgpt")
    factgpt.train(out, seed=1, device="cpu", progress=False, config=TINY)
    return factgpt.load(out)


# --- world and training --------------------------------------------------------------------

def test_names_share_last_words_but_are_distinct() -> None:
    world = FactWorld.generate(FactWorldConfig(seed=2, n_subjects=60, shared_last_words=5))
    last = Counter(s.split()[-1] for s in world.subjects)
    assert len(last) <= 5 and len(set(world.subjects)) == 60
    fresh = FactWorld.generate(FactWorldConfig(seed=2, n_subjects=60, shared_last_words=0))
    assert len({s.split()[-1] for s in fresh.subjects}) > 30


def test_a_manifest_written_before_shared_last_words_loads_as_fresh_words(tmp_path: Path) -> None:
    world = FactWorld.generate(FactWorldConfig(seed=4, n_subjects=30, shared_last_words=0))
    data = json.loads(world.to_json())
    del data["config"]["shared_last_words"]
    loaded = FactWorld.from_dict(data)
    assert loaded.config.shared_last_words == 0 and loaded == world


def test_bottleneck_mask_hides_all_but_the_subjects_last_token() -> None:
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    out = factgpt._bottleneck_mask(mask, [(1, 3), (2, 4)], torch.tensor([1]), torch.float32)
    seen = out[:, 0] == 0
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(seen[0], causal & mask[0].bool())  # row 0 is not masked: causal + padding only
    assert not seen[1, 4:, 2].any()  # after the subject (tokens 2-3): token 2 hidden
    assert seen[1, 4:, 3].all() and seen[1, 3, 2]  # its last token stays visible; inside the subject all is seen
    assert seen[1, 4:, :2].all()  # the template before the subject stays visible


def test_training_with_the_bottleneck_is_seeded(tmp_path: Path) -> None:
    cfg = replace(TINY, max_steps=3)
    for name in ("a", "b"):
        factgpt.train(tmp_path / name, seed=3, device="cpu", progress=False, config=cfg)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
    factgpt.train(tmp_path / "c", seed=3, device="cpu", progress=False, config=replace(cfg, subject_bottleneck=0.0))
    assert a != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_trained_folder_ships_its_editor_options(tiny) -> None:
    """The measured options travel in the model's folder: the zoo loader and a plain folder load both read them."""
    shipped = read_editor_defaults(factgpt.EDITOR_DEFAULTS_SOURCE)
    assert shipped["rome"]["layer"] == 0 and shipped["memit"]["layers"] == [0]
    assert (tiny.path / EDITOR_DEFAULTS_FILE).is_file()
    assert tiny.info["editor_defaults"] == shipped
    assert load(str(tiny.path), device="cpu", progress=False).info["editor_defaults"] == shipped


# --- statistics at the fact token ------------------------------------------------------------

def test_sample_mask_counts_only_the_marked_positions(tiny) -> None:
    enc = tiny.tokenizer(["The capital of a b is", "In x y, people speak"], return_tensors="pt", padding=True)
    sample = torch.zeros_like(enc["attention_mask"])
    sample[0, 2] = sample[1, 1] = 1
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "sample_mask": sample}
    stats = collect_statistics(tiny, key_site(0), [batch], cache=False, progress=False)
    from workbench.hooks import capture

    with capture(tiny, [key_site(0)]) as acts, torch.no_grad():
        tiny.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    x = acts[key_site(0)][sample.bool()].double()
    assert stats.count == 2
    torch.testing.assert_close(stats.second_moment, x.T @ x / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fact_token", ["subject_last", "prompt_last"])
def test_prompts_corpus_reads_keys_at_the_fact_token(tiny, fact_token: str) -> None:
    world = tiny.info["world"]
    stats = key_statistics(tiny, 1, corpus="prompts", fact_token=fact_token, n_samples=10_000)
    prompts = world.prompts()
    located = [locate(tiny.tokenizer, "{}", world.relation(p.relation_id).templates[p.template_index], p.subject,
                      fact_token) for p in prompts]
    keys = site_at_subject(tiny, key_site(1), located).double()
    assert stats.count == len(prompts)
    torch.testing.assert_close(stats.second_moment, keys.T @ keys / len(keys), rtol=1e-4, atol=1e-6)
    other = key_statistics(tiny, 1, corpus="prompts", fact_token="prompt_last" if fact_token == "subject_last"
                           else "subject_last", n_samples=10_000)
    assert not torch.allclose(stats.second_moment, other.second_moment)


# --- values, prefixes, neighbourhoods ----------------------------------------------------

def test_joint_values_give_one_delta_per_subject(tiny) -> None:
    world = tiny.info["world"]
    subject = world.subjects[0]
    rws = [Rewrite(prompt=rel.templates[0], subject=subject, target_new=rel.objects[1], target_true=rel.objects[0])
           for rel in world.relations]
    rws.append(Rewrite(prompt=world.relations[0].templates[0], subject=world.subjects[1],
                       target_new=world.relations[0].objects[2]))
    cfg = ValueConfig(steps=4, stop_nll=0.0)
    joint = optimize_values(tiny, rws, layer=0, site_kind="mlp_out", templates=["{}"],
                            config=replace(cfg, joint_subject=True))
    apart = optimize_values(tiny, rws, layer=0, site_kind="mlp_out", templates=["{}"], config=cfg)
    assert torch.equal(joint.delta[0], joint.delta[1])  # one subject, one delta
    assert not torch.equal(joint.delta[0], joint.delta[2])
    assert not torch.equal(apart.delta[0], apart.delta[1])
    # one subject alone: joint and separate optimization are the same computation
    single = optimize_values(tiny, rws[2:], layer=0, site_kind="mlp_out", templates=["{}"],
                             config=replace(cfg, joint_subject=True))
    alone = optimize_values(tiny, rws[2:], layer=0, site_kind="mlp_out", templates=["{}"], config=cfg)
    assert torch.equal(single.delta, alone.delta)


def test_sampled_prefixes_differ_and_are_seeded(tiny) -> None:
    texts = sample_texts(tiny, 6, length=6, seed=0)
    assert len(set(texts)) > 1  # greedy decoding would give six copies of one text
    assert texts == sample_texts(tiny, 6, length=6, seed=0)


def test_world_prefixes_are_seeded_filler_sentences_without_subjects(tiny) -> None:
    templates = context_templates(tiny, n_prefixes=5, length=8, seed=0, source="world")
    assert templates[0] == "{}" and len(templates) == 6
    assert all(t.endswith(". {}") for t in templates[1:]) and len(set(templates)) == 6
    world = tiny.info["world"]
    assert not any(name in t for t in templates for name in (*world.subjects, *world.objects))
    assert templates == context_templates(tiny, n_prefixes=5, length=8, seed=0, source="world")
    assert templates != context_templates(tiny, n_prefixes=5, length=8, seed=1, source="world")


def test_world_prefixes_need_a_world_and_a_known_source(load_tiny) -> None:
    with pytest.raises(WorkbenchError, match="generated"):
        context_templates(load_tiny("gpt2"), n_prefixes=2, length=4, seed=0, source="world")
    with pytest.raises(WorkbenchError, match="prefix_source='wiki'"):
        context_templates(load_tiny("gpt2"), n_prefixes=2, length=4, seed=0, source="wiki")  # type: ignore[arg-type]
    with pytest.raises(WorkbenchError, match="prefix_source"):
        MEMIT(prefix_source="wiki")  # type: ignore[arg-type]
    with pytest.raises(WorkbenchError, match="value_contexts"):
        MEMIT(value_contexts="some")  # type: ignore[arg-type]
    with pytest.raises(WorkbenchError, match="prefix_source"):
        ROME(prefix_source="wiki")  # type: ignore[arg-type]


def test_rome_averages_its_key_over_the_world_prefixes(tiny, monkeypatch) -> None:
    import editors.rome as rome_module

    seen = []
    real = rome_module.subject_keys

    def spy(handle, layer, requests, templates, **kwargs):
        seen.append(list(templates))
        return real(handle, layer, requests, templates, **kwargs)

    monkeypatch.setattr(rome_module, "subject_keys", spy)
    rw = Rewrite.from_counterfact(tiny.info["world"].counterfact_records(1, seed=0)[0])
    ROME(layer=0, n_prefixes=2, prefix_source="world", v_steps=2, mom2_n_samples=200).fit(tiny, rw)
    assert seen == [context_templates(tiny, n_prefixes=2, length=8, seed=0, source="world")]


@pytest.mark.parametrize("value_contexts", ["all", "plain"])
def test_memit_value_contexts_choose_what_the_value_optimization_sees(tiny, monkeypatch, value_contexts) -> None:
    import editors.memit as memit_module

    seen = []
    real = memit_module.optimize_values

    def spy(*args, templates, **kwargs):
        seen.append(list(templates))
        return real(*args, templates=templates, **kwargs)

    monkeypatch.setattr(memit_module, "optimize_values", spy)
    rws = [Rewrite.from_counterfact(r) for r in tiny.info["world"].counterfact_records(3, seed=0)]
    editor = MEMIT(layers=(0,), n_prefixes=2, prefix_source="world", value_contexts=value_contexts, v_steps=2,
                   mom2_n_samples=200)
    delta = editor.fit(tiny, rws)
    assert delta.extra["n_contexts"] == 3  # the keys still average over every context
    assert seen == ([["{}"]] if value_contexts == "plain" else [context_templates(tiny, n_prefixes=2, length=8,
                                                                                  seed=0, source="world")])


def test_drop_batch_conflicts_removes_neighbours_rewritten_in_the_batch() -> None:
    world = FactWorld.generate(FactWorldConfig(seed=0))
    rws = [Rewrite.from_counterfact(r) for r in world.counterfact_records(400, seed=0)]
    clean, dropped = drop_batch_conflicts(rws, world.subjects)
    edited = {(rw.subject, rw.relation_id) for rw in rws}
    kept = sum(len(rw.neighborhood_prompts) for rw in clean)
    assert dropped > 0 and kept + dropped == sum(len(rw.neighborhood_prompts) for rw in rws)
    for rw in clean:
        for p in rw.neighborhood_prompts:
            subject = max((s for s in world.subjects if s in p), key=len)
            assert (subject, rw.relation_id) not in edited


# --- the edit command's options ------------------------------------------------------------

def test_edit_set_unknown_field_exits_2(capsys) -> None:
    code = cli.main(["edit", "rome", "zoo:factgpt", "--subject", "a b", "--prompt", "{} is", "--target", "x",
                     "--set", "bogus=1"])
    err = capsys.readouterr().err
    assert code == 2 and "bogus" in err and "n_prefixes" in err


def test_large_variant_has_room_for_500_distinct_subject_rewrites_with_whole_word_names() -> None:
    from workbench.zoo import factgpt_large

    world = FactWorld.generate(replace(factgpt_large.CONFIG.world, seed=factgpt_large.DEFAULT_SEED))
    assert len(world.counterfact_records(500, seed=0, distinct_subjects=True)) == 500
    tok = factgpt.build_tokenizer(world, vocab_size=factgpt_large.CONFIG.vocab_size)
    lengths = {len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in world.subjects}
    assert lengths == {2}  # every name is two whole-word tokens, as in FactGPT


def test_large_variant_loads_under_its_own_spec(tiny, tmp_path) -> None:
    from workbench.zoo import factgpt_large

    handle = factgpt_large.load(tiny.path)
    assert handle.spec == "zoo:factgpt-large" and handle.info["world"] == tiny.info["world"]
