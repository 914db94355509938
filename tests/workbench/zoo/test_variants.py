"""Held-out zoo variants: names, architectures, the subject-bottleneck mask per architecture, checks, caching.

Every training here is tiny (a 24-subject world, a few steps); the real variants are trained by
`workbench zoo train NAME --seed N` into the normal cache.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from workbench import zoo
from workbench.errors import UnknownModelError, WorkbenchError
from workbench.models import load
from workbench.worlds.factworld import FactWorld, FactWorldConfig
from workbench.worlds.shapesworld import WorldConfig
from workbench.worlds.trojans import TRIGGER_LIBRARY, generated_trojans, same_trigger
from workbench.zoo import factgpt, shapesnet, variants
from workbench.zoo.variants import FactGPTVariant, ShapesNetVariant, ZooCheckError
from workbench_cli.main import main

TINY = factgpt.FactGPTConfig(
    world=FactWorldConfig(n_subjects=24, n_relations=2, objects_per_relation=4, shared_last_words=4),
    vocab_size=400, n_layers=2, d_model=32, n_heads=2, batch_size=16, max_steps=6, check_every=3,
)
TINY_SHAPES = shapesnet.TrainConfig(n_train=256, epochs=1, batch_size=64, n_eval=64, n_eval_trojan=16,
                                    world=WorldConfig(image_size=32))
ARCHS = ("gpt2", "neox", "llama")


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    """A private cache whose variant recipes are tiny and whose checks every tiny model passes."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(variants, "factgpt_base", lambda: TINY)
    monkeypatch.setattr(variants, "shapesnet_base", lambda: TINY_SHAPES)
    for bound in ("MIN_FACT_ACCURACY", "MIN_PREFIXED_ACCURACY", "MIN_CLEAN_ACCURACY", "MIN_ATTACK_SUCCESS"):
        monkeypatch.setattr(variants, bound, 0.0)
    return tmp_path / "cache"


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --- names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "expected"), [
    ("factgpt-gpt2-4l", FactGPTVariant("gpt2", 4)),
    ("factgpt-neox-2l", FactGPTVariant("neox", 2)),
    ("factgpt-llama-4l-plain", FactGPTVariant("llama", 4, enriched=False)),
    ("shapesnet-w24", ShapesNetVariant(24)),
])
def test_variant_names_parse_to_their_recipes(name: str, expected) -> None:
    assert zoo.parse_spec(name) == (name, None)
    assert zoo.parse_spec(f"{name}@7") == (name, 7)
    assert zoo._module(name) == expected and expected.name == name
    assert zoo.entry_dir(name, cache="/c").name == f"{name}-v1-seed{variants.DEFAULT_SEED}"
    assert zoo.is_name(name)


@pytest.mark.parametrize(("name", "message"), [
    ("factgpt-gpt3-4l", "unknown architecture 'gpt3'; expected one of gpt2, neox, llama"),
    ("factgpt-neox-0l", "0 layers; expected 1..12"),
    ("factgpt-neox-13l", "13 layers; expected 1..12"),
    ("factgpt-neox-04l", "write it as 'factgpt-neox-4l'"),
    ("factgpt-neox", "a factgpt variant is named factgpt-ARCH-Ll[-plain]"),
    ("factgpt-neox-4l-plainer", "a factgpt variant is named"),
    ("shapesnet-w2", "width 2; expected 4..64"),
    ("shapesnet-24", "a shapesnet variant is named shapesnet-wW"),
    ("factgpts", "the zoo has: factgpt, factgpt-large, shapesnet, and variants factgpt-ARCH-Ll"),
])
def test_bad_variant_names_are_one_line_errors(name: str, message: str, capsys) -> None:
    with pytest.raises(UnknownModelError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(f"zoo:{name}", device="cpu", progress=False)
    assert not zoo.is_name(name)
    code, out, err = _run(capsys, ["zoo", "info", name])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_variants_refuse_the_development_seed(tmp_path, capsys) -> None:
    with pytest.raises(UnknownModelError, match=r"seed after '@' must be an integer 1\.\."):
        zoo.parse_spec("factgpt-neox-4l@0")
    with pytest.raises(WorkbenchError, match=r"expected an integer 1\.\."):
        zoo.entry_dir("shapesnet-w24", seed=0, cache=tmp_path)
    with pytest.raises(WorkbenchError, match="0 is the development models' seed"):
        FactGPTVariant("gpt2", 2).train(tmp_path / "m", seed=0, progress=False, config=TINY)
    assert zoo.parse_spec("factgpt@0") == ("factgpt", 0)  # the named models keep seed 0
    code, _, err = _run(capsys, ["zoo", "train", "factgpt-neox-4l", "--seed", "0", "--cache", str(tmp_path)])
    assert code == 2 and "expected an integer 1.." in err
    assert not (tmp_path / "zoo" / "factgpt-neox-4l-v1-seed0").exists()


# --- architectures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world() -> FactWorld:
    return FactWorld.generate(replace(TINY.world, seed=3, draw_relations=True))


@pytest.fixture(scope="module")
def tokenizer(world: FactWorld):
    return factgpt.build_tokenizer(world, vocab_size=TINY.vocab_size)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_builds_seeded_with_tied_embeddings(arch: str, tokenizer) -> None:
    config = replace(TINY, arch=arch, n_layers=3)
    model = factgpt.build_model(config, tokenizer, seed=4)
    model_type, cls = factgpt.ARCHS[arch]
    assert type(model) is cls and model.config.model_type == model_type
    assert model.config.num_hidden_layers == 3 and model.config.hidden_size == 32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.vocab_size == len(tokenizer) and model.config.pad_token_id == tokenizer.pad_token_id
    again = factgpt.build_model(config, tokenizer, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other = factgpt.build_model(config, tokenizer, seed=5)
    assert not torch.equal(model.get_input_embeddings().weight, other.get_input_embeddings().weight)


def test_mlp_widths_follow_each_architectures_rule() -> None:
    base = factgpt.FactGPTConfig()
    assert factgpt.mlp_width(base) == 512 and factgpt.mlp_width(replace(base, arch="neox")) == 512
    assert factgpt.mlp_width(replace(base, arch="llama")) == 344  # 8/3 x 128, up to a multiple of 8
    assert factgpt.mlp_width(replace(base, arch="llama", d_mlp=400)) == 400
    with pytest.raises(WorkbenchError, match="FactGPT arch 'mamba'"):
        factgpt.FactGPTConfig(arch="mamba")


def test_the_zoos_gpt2_config_is_built_as_before(tokenizer) -> None:
    model = factgpt.build_model(factgpt.FactGPTConfig(), tokenizer, seed=0)
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_inner, c.n_positions) == (4, 128, 4, None, 64)
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.0, 0.0, 0.0)


def _subject_batch(world: FactWorld, tokenizer) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """A fact prompt twice, the second with the subject's first token changed; each row's subject span."""
    from workbench.requests import subject_token_span

    prompt = world.prompts()[0]
    start, end = subject_token_span(tokenizer, prompt.text, prompt.subject)
    assert end - start >= 2 and end < len(tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
    a = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    b = list(a)
    b[start] = (b[start] + 7) % len(tokenizer)
    ids = torch.tensor([a, b])
    return ids, torch.ones_like(ids), [(start, end), (start, end)]


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_honours_the_subject_bottleneck_mask(arch: str, world, tokenizer) -> None:
    """One layer: with the mask, what follows the subject cannot see its first token; without it, it does."""
    model = factgpt.build_model(replace(TINY, arch=arch, n_layers=1), tokenizer, seed=1).eval()
    ids, mask, spans = _subject_batch(world, tokenizer)
    end = spans[0][1]
    bottleneck = factgpt._bottleneck_mask(mask, spans, torch.tensor([0, 1]), torch.float32)
    with torch.no_grad():
        masked = model.base_model(input_ids=ids, attention_mask=bottleneck).last_hidden_state
        plain = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(masked[0, end:], masked[1, end:], atol=1e-6)  # after the subject: blind to its first token
    assert not torch.allclose(plain[0, end:], plain[1, end:], atol=1e-4)
    assert torch.allclose(masked[:, :end], plain[:, :end], atol=1e-6)  # up to the subject's end: as causal


@pytest.mark.parametrize("arch", ARCHS)
def test_one_training_step_with_the_bottleneck_mask(arch: str, world, tokenizer) -> None:
    model = factgpt.build_model(replace(TINY, arch=arch), tokenizer, seed=2).train()
    ids, mask, spans = _subject_batch(world, tokenizer)
    obj = torch.zeros_like(ids, dtype=torch.bool)
    obj[:, -1] = True
    bottleneck = factgpt._bottleneck_mask(mask, spans, torch.tensor([0]), torch.float32)
    loss, hits = factgpt._loss(model, ids, mask, obj, lm_weight=0.25, attn_mask=bottleneck)
    unmasked, _ = factgpt._loss(model, ids, mask, obj, lm_weight=0.25)
    assert torch.isfinite(loss) and hits.shape == (2,) and float(loss.detach()) != float(unmasked.detach())
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# --- end to end in a private cache -----------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_a_variant_trains_caches_and_loads_as_a_plain_hf_folder(arch: str, tiny_zoo: Path) -> None:
    name = f"factgpt-{arch}-2l"
    h = load(f"zoo:{name}@2", device="cpu", progress=False)
    folder = zoo.entry_dir(name, seed=2)
    assert h.spec == f"zoo:{name}@2" and h.path == folder and type(h.model) is factgpt.ARCHS[arch][1]
    assert h.arch.n_layers == 2 and h.arch.family == factgpt.ARCHS[arch][0]
    assert h.world == FactWorld.generate(replace(TINY.world, seed=2, draw_relations=True))
    assert h.info["name"] == name and h.info["arch"] == arch and h.info["subject_bottleneck"] == TINY.subject_bottleneck
    assert [c["check"] for c in h.info["checks"]] == ["fact accuracy", "fact accuracy behind a filler sentence"]
    assert h.info["editor_defaults"] == variants.EDITOR_DEFAULTS  # nothing measured: no layer
    assert all("layer" not in o and "layers" not in o for o in h.info["editor_defaults"].values())
    assert {"model.safetensors", "config.json", "tokenizer.json", "world.json", "editor_defaults.json",
            zoo.INFO, zoo.MANIFEST} <= {f.name for f in folder.iterdir()}
    assert not [f for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".pkl")]
    plain = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    ids = h.tokenizer(h.world.prompts()[0].text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, h.model(ids).logits)
    via_folder = load(str(folder), device="cpu", progress=False)
    assert zoo.folder_model(folder) == name and via_folder.info["name"] == name
    with torch.no_grad():
        assert torch.equal(via_folder.model(ids).logits, h.model(ids).logits)


def test_a_plain_variant_trains_without_the_mask(tiny_zoo: Path, monkeypatch) -> None:
    def no_mask(*args, **kwargs):
        raise AssertionError("a -plain variant built a subject-bottleneck mask")

    monkeypatch.setattr(factgpt, "_bottleneck_mask", no_mask)
    h = zoo.load("factgpt-neox-2l-plain", seed=3, progress=False)
    assert h.info["subject_bottleneck"] == 0.0 and h.info["name"] == "factgpt-neox-2l-plain"
    enriched = FactGPTVariant("neox", 2).config(TINY)
    plain = FactGPTVariant("neox", 2, enriched=False).config(TINY)
    assert enriched.world == plain.world and replace(enriched, subject_bottleneck=0.0) == plain


def test_a_weak_variant_is_an_error_naming_the_check_and_leaves_nothing_cached(tiny_zoo: Path, monkeypatch,
                                                                                capsys) -> None:
    monkeypatch.setattr(variants, "MIN_FACT_ACCURACY", 0.99)
    with pytest.raises(ZooCheckError, match=r"factgpt-llama-2l@4 failed its check: fact accuracy 0\.\d+ < 0\.99 "
                                            r"\(short by 0\.\d+\)") as caught:
        zoo.ensure_trained("factgpt-llama-2l", seed=4, progress=False)
    assert "filler" not in str(caught.value)  # the passing check is not named
    assert not zoo.entry_dir("factgpt-llama-2l", seed=4).exists()
    assert [p.name for p in (tiny_zoo / "zoo").iterdir()] == ["factgpt-llama-2l-v1-seed4.lock"]
    code, out, err = _run(capsys, ["zoo", "info", "factgpt-llama-2l@4"])
    assert code == 2 and out == "" and "failed its check: fact accuracy" in err and len(err.strip().splitlines()) == 1


def test_a_copy_of_a_variant_without_zoo_files_gets_no_measured_options(tiny_zoo: Path, tmp_path) -> None:
    folder = zoo.ensure_trained("factgpt-gpt2-2l", seed=2, progress=False)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        if f.name not in (zoo.INFO, zoo.MANIFEST, "editor_defaults.json"):
            (copy / f.name).write_bytes(f.read_bytes())
    h = load(str(copy), device="cpu", progress=False)
    assert h.world.config.draw_relations and h.info["editor_defaults"] == {}
    assert zoo.folder_info(copy)["editor_defaults"] == ""


def test_shapesnet_variant_trains_its_width_with_generated_trojans(tiny_zoo: Path, capsys) -> None:
    h = load("zoo:shapesnet-w8@3", device="cpu", progress=False)
    assert h.spec == "zoo:shapesnet-w8@3" and h.model.config.channels == (8, 16, 32)
    trojans = shapesnet.world_of(h).trojans
    assert trojans.names == generated_trojans(3).names
    assert not any(same_trigger(t.trigger, d) for t in trojans for d in TRIGGER_LIBRARY.values())
    info = h.info
    assert info["name"] == "shapesnet-w8" and info["width"] == 8 and info["trojan_seed"] == 3
    assert [c["check"] for c in info["checks"]] == ["clean accuracy"] + [
        f"attack success of trojan {n}" for n in trojans.names]
    code, out, err = _run(capsys, ["zoo", "info", "shapesnet-w8@3", "--json"])  # cached: no retraining
    assert code == 0, err
    assert json.loads(out)["path"] == str(zoo.entry_dir("shapesnet-w8", seed=3)) and json.loads(out)["width"] == 8


def test_a_weak_shapesnet_variant_names_the_failed_check(tiny_zoo: Path, monkeypatch) -> None:
    monkeypatch.setattr(variants, "MIN_CLEAN_ACCURACY", 0.99)
    with pytest.raises(ZooCheckError, match=r"shapesnet-w4@2 failed its check: clean accuracy 0\.\d+ < 0\.99"):
        zoo.ensure_trained("shapesnet-w4", seed=2, progress=False)
    assert not zoo.entry_dir("shapesnet-w4", seed=2).exists()


def test_listing_shows_named_models_and_trained_variants(tiny_zoo: Path) -> None:
    zoo.ensure_trained("factgpt-gpt2-1l-plain", seed=5, progress=False)
    (tiny_zoo / "zoo" / "factgpt-gpt2-1l-v7-seed1").mkdir()  # another recipe version: not listed
    rows = zoo.listing()
    assert [r["name"] for r in rows] == [*zoo.names(), *zoo.architecture_names(), "factgpt-gpt2-1l-plain"]
    assert rows[-1]["spec"] == "zoo:factgpt-gpt2-1l-plain@5" and rows[-1]["cached"]
    assert rows[-1]["path"] == str(zoo.entry_dir("factgpt-gpt2-1l-plain", seed=5))
    assert not any(r["cached"] for r in rows[:-1])
    assert all(r["cached"] is None for r in rows if r["name"] in zoo.architecture_names())  # built on load
