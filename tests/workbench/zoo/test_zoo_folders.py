"""Zoo models at any seed (`zoo:NAME@SEED`) and zoo folders loaded as the zoo loads them.

A folder from `workbench zoo train NAME --seed N` (or a copy, or an edited FactGPT saved with
its world) loads through `workbench.load(FOLDER)` with its world, its measured editor options
and its training record, and an edit on it gives the numbers the zoo loader gives.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from workbench import zoo
from workbench.errors import CorruptFileError, UnknownModelError, WorkbenchError
from workbench.models import load
from workbench.worlds.factworld import FactWorld, FactWorldConfig
from workbench.worlds.shapesworld import WorldConfig
from workbench.zoo import factgpt, shapesnet
from workbench_cli.main import main

TINY = factgpt.FactGPTConfig(
    world=FactWorldConfig(n_subjects=24, n_relations=2, objects_per_relation=4, shared_last_words=4),
    vocab_size=400, n_layers=2, d_model=32, n_heads=2, batch_size=16, max_steps=6, check_every=3,
)
TINY_SHAPES = shapesnet.TrainConfig(n_train=256, epochs=1, batch_size=64, n_eval=64, n_eval_trojan=16,
                                    world=WorldConfig(image_size=32))
SEED = 5


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private zoo cache whose FactGPT and ShapesNet recipes are tiny (never the real training)."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("zoo-cache")
    mp.setenv("WORKBENCH_CACHE", str(root))
    trained: list[int] = []
    real_train = factgpt.train

    def tiny_factgpt(out, *, seed, device="cpu", progress=True):
        trained.append(seed)
        return real_train(out, seed=seed, device=device, progress=False, config=TINY)

    mp.setattr(factgpt, "train", tiny_factgpt)
    mp.setattr(shapesnet, "train", functools.partial(shapesnet.train, config=TINY_SHAPES))
    yield root, trained
    mp.undo()


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_seed_in_the_spec_trains_once_and_is_cached(cache) -> None:
    _, trained = cache
    h = load(f"zoo:factgpt@{SEED}", device="cpu", progress=False)
    assert h.spec == f"zoo:factgpt@{SEED}" and h.info["seed"] == SEED
    assert isinstance(h.world, FactWorld) and h.world.config.seed == SEED
    again = load(f"zoo:factgpt@{SEED}", device="cpu", progress=False)
    assert trained.count(SEED) == 1  # the second load used the cache
    assert h.path == again.path == zoo.entry_dir("factgpt", seed=SEED)
    assert h.path.name.endswith(f"seed{SEED}")


@pytest.mark.parametrize("spec", ["zoo:factgpt@x", "zoo:factgpt@-1", "zoo:factgpt@", "zoo:factgpt@1.5",
                                  "zoo:shapesnet@99999999999"])
def test_bad_seeds_are_one_line_errors(spec: str, capsys) -> None:
    with pytest.raises(UnknownModelError, match="seed after '@' must be an integer"):
        load(spec, device="cpu", progress=False)
    code, out, err = _run(capsys, ["sites", spec, "--device", "cpu"])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "seed after '@'" in err


def test_negative_seed_is_refused_by_the_registry(tmp_path) -> None:
    with pytest.raises(WorkbenchError, match="expected an integer 0.."):
        zoo.entry_dir("factgpt", seed=-1, cache=tmp_path)


def test_the_cache_folder_loads_with_what_the_zoo_ships(cache) -> None:
    via_zoo = load(f"zoo:factgpt@{SEED}", device="cpu", progress=False)
    folder = zoo.entry_dir("factgpt", seed=SEED)
    via_folder = load(str(folder), device="cpu", progress=False)
    assert via_folder.spec == str(folder) and via_folder.path == folder
    assert via_folder.world == via_zoo.world
    assert via_folder.info["editor_defaults"] == via_zoo.info["editor_defaults"]
    assert via_folder.info["editor_defaults"]["rome"]["prefix_source"] == "world"
    assert {k: v for k, v in via_folder.info.items() if k not in ("world",)} == \
        {k: v for k, v in via_zoo.info.items() if k not in ("world",)}
    ids = via_zoo.tokenizer("The capital of", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(via_zoo.model(ids).logits, via_folder.model(ids).logits)
    assert via_folder.model.config.pad_token_id == via_zoo.model.config.pad_token_id


def test_a_copy_without_zoo_files_still_carries_its_world(cache, tmp_path) -> None:
    folder = zoo.entry_dir("factgpt", seed=SEED)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    for name in (zoo.INFO, zoo.MANIFEST, "editor_defaults.json"):
        (copy / name).unlink()
    h = load(str(copy), device="cpu", progress=False)
    assert isinstance(h.world, FactWorld) and h.world == FactWorld.load(folder / factgpt.WORLD_FILE)
    assert h.info["editor_defaults"]["rome"]["layer"] == 0  # the package's table for FactGPT


def test_a_tampered_zoo_folder_is_refused(cache, tmp_path) -> None:
    copy = tmp_path / "tampered"
    shutil.copytree(zoo.entry_dir("factgpt", seed=SEED), copy)
    (copy / factgpt.WORLD_FILE).write_text((copy / factgpt.WORLD_FILE).read_text().replace('"seed"', '"seed" ', 1))
    with pytest.raises(CorruptFileError, match="fails its checksum"):
        load(str(copy), device="cpu", progress=False)


def test_edit_on_the_folder_equals_edit_on_the_zoo_spec(cache, tmp_path, capsys) -> None:
    records = tmp_path / "rec.json"
    code, _, err = _run(capsys, ["world", "export", "factworld", "--model", f"zoo:factgpt@{SEED}", "--n", "3",
                                 "--out", str(records)])
    assert code == 0, err
    common = ["--records", str(records), "--layer", "auto", "--mom2-samples", "2000", "--no-fluency", "--device", "cpu",
              "--json"]
    folder = zoo.entry_dir("factgpt", seed=SEED)
    results = {}
    for spec in (f"zoo:factgpt@{SEED}", str(folder)):
        code, out, err = _run(capsys, ["edit", "rome", spec, *common, "--set", "prefix_source=world"])
        assert code == 0, err
        results[spec] = json.loads(out)
    a, b = results.values()
    assert a["editor"] == b["editor"] and a["editor"]["prefix_source"] == "world"
    assert a["metrics"] == b["metrics"] and a["unedited"] == b["unedited"] and a["layer"] == b["layer"]
    saved = tmp_path / "saved"
    code, _, err = _run(capsys, ["edit", "rome", str(folder), *common, "--n", "1", "--save-model", str(saved)])
    assert code == 0, err
    edited = load(str(saved), device="cpu", progress=False)  # an edited FactGPT keeps its world
    assert edited.world == FactWorld.load(folder / factgpt.WORLD_FILE)
    assert edited.info["editor_defaults"]["rome"]["prefix_source"] == "world"


def test_zoo_info_accepts_folders_and_seeded_names(cache, tiny_model_dirs, capsys) -> None:
    folder = zoo.entry_dir("factgpt", seed=SEED)
    code, out, err = _run(capsys, ["zoo", "info", str(folder), "--json"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["name"] == "factgpt" and doc["seed"] == SEED and doc["world"] is True and doc["zoo_model"] == "factgpt"
    assert doc["path"] == str(folder) and "rome" in doc["editor_defaults"] and "accuracy" in doc
    code, out, _ = _run(capsys, ["zoo", "info", f"factgpt@{SEED}", "--json"])
    assert code == 0 and json.loads(out)["seed"] == SEED and json.loads(out)["path"] == str(folder)
    code, out, _ = _run(capsys, ["zoo", "info", str(tiny_model_dirs["gpt2"])])
    assert code == 0 and "no accuracy recorded" in out and "model_type: gpt2" in out
    code, _, err = _run(capsys, ["zoo", "info", str(folder), "--seed", "3"])
    assert code == 2 and "--seed applies to zoo model names" in err
    code, _, err = _run(capsys, ["zoo", "info", "./no-such-folder"])
    assert code == 2 and "no model folder" in err


def test_shapesnet_folder_and_seed(cache, capsys) -> None:
    h = load("zoo:shapesnet@2", device="cpu", progress=False)
    folder = zoo.entry_dir("shapesnet", seed=2)
    assert h.spec == "zoo:shapesnet@2" and h.info["seed"] == 2
    via_folder = load(str(folder), device="cpu", progress=False)
    assert via_folder.info["world"] == h.info["world"] and shapesnet.world_of(via_folder).trojans.names
    assert via_folder.info["accuracy"] == h.info["accuracy"] and via_folder.info["trojans"] == h.info["trojans"]
    code, out, _ = _run(capsys, ["zoo", "info", str(folder)])
    assert code == 0 and "attack success" in out and "shapesnet: accuracy" in out


def test_plain_folders_are_not_zoo_folders(tiny_model_dirs) -> None:
    assert zoo.folder_model(tiny_model_dirs["gpt2"]) is None
    assert "world" not in load(str(tiny_model_dirs["gpt2"]), device="cpu", progress=False).info
    with pytest.raises(UnknownModelError, match="holds no zoo model"):
        zoo.load_folder(Path(tiny_model_dirs["gpt2"]))
