"""ShapesNet: the zoo figures (accuracy, trojan success), loading, determinism, tampering."""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil

import pytest
import torch

from workbench import zoo
from workbench.errors import CorruptFileError, WorkbenchError
from workbench.storage import sha256_file
from workbench.worlds.shapesworld import WorldConfig
from workbench.zoo import shapesnet

TINY = shapesnet.TrainConfig(n_train=256, epochs=1, batch_size=64, n_eval=64, n_eval_trojan=16,
                             world=WorldConfig(image_size=32))


@pytest.fixture(scope="module")
def trained():
    """The real zoo ShapesNet, trained once into the normal cache and shared with other tests."""
    path = zoo.ensure_trained("shapesnet", progress=False)
    return path, json.loads((path / "zoo_info.json").read_text())


@pytest.mark.slow
def test_zoo_figures(trained):
    _, info = trained
    assert info["name"] == "shapesnet"
    assert info["accuracy"] >= 0.95
    assert info["train_seconds"] <= 300
    kinds = {t["kind"] for t in info["trojans"]}
    assert kinds == {"patch", "style", "natural"}
    for t in info["trojans"]:
        assert t["attack_success"] >= 0.90, t
        if t["source"] is not None:
            assert t["off_source_to_target"] <= 0.2, t  # class-universal: other classes barely move
    assert 0.0 <= info["spurious"] <= 1.0
    assert info["image_size"] == 48 and info["n_params"] > 10_000


@pytest.mark.slow
def test_load_handle_and_reevaluate(trained):
    path, info = trained
    h = zoo.load("shapesnet", progress=False)
    assert h.kind == "image_classifier" and h.arch.family == "cnn"
    pp = h.preprocess
    assert pp is not None and pp.input_range == (0.0, 1.0) and pp.normalization_in_model
    assert pp.height == pp.width == info["image_size"] and len(pp.class_names) == 8
    assert {t["name"] for t in h.info["world"]["trojans"]} == {t["name"] for t in info["trojans"]}
    names = dict(h.model.named_modules())
    assert "layer2" in names and "layer2.conv2" in names and "fc" in names
    m = shapesnet.evaluate(h, n=400, n_trojan=100, seed=7)
    assert m["accuracy"] >= 0.93
    for t in m["trojans"]:
        assert t["attack_success"] >= 0.85, t


@pytest.mark.slow
def test_direct_load_of_corrupt_checkpoint(trained, tmp_path):
    path, _ = trained
    copy = tmp_path / "net"
    shutil.copytree(path, copy)
    # a changed byte fails the recorded checksum
    data = bytearray((copy / shapesnet.WEIGHTS).read_bytes())
    data[-5] ^= 0xFF
    (copy / shapesnet.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum"):
        shapesnet.load(copy)
    # an unparseable file without a recorded checksum is still a clear error
    cfg = json.loads((copy / shapesnet.CONFIG).read_text())
    cfg.pop("weights_sha256")
    (copy / shapesnet.CONFIG).write_text(json.dumps(cfg))
    (copy / shapesnet.WEIGHTS).write_bytes(b"not a safetensors file at all")
    with pytest.raises(CorruptFileError, match="safetensors"):
        shapesnet.load(copy)


def test_tiny_training_is_deterministic_and_loads(tmp_path):
    # Same seed -> same file bytes: the safetensors header is written with sorted keys
    # (the library's own writer orders metadata by a hash map, which once made this flaky).
    a = shapesnet.train(tmp_path / "a", seed=3, progress=False, config=TINY)
    b = shapesnet.train(tmp_path / "b", seed=3, progress=False, config=TINY)
    assert sha256_file(tmp_path / "a" / shapesnet.WEIGHTS) == sha256_file(tmp_path / "b" / shapesnet.WEIGHTS)
    assert a["accuracy"] == b["accuracy"] and a["trojans"] == b["trojans"]
    shapesnet.train(tmp_path / "c", seed=4, progress=False, config=TINY)
    assert sha256_file(tmp_path / "c" / shapesnet.WEIGHTS) != sha256_file(tmp_path / "a" / shapesnet.WEIGHTS)
    h = shapesnet.load(tmp_path / "a")
    x = torch.rand(2, 3, 32, 32)
    assert h.model(x).shape == (2, 8)
    assert set(a) >= {"name", "accuracy", "trojans", "spurious", "n_params", "image_size", "train_seconds"}
    assert all(set(t) >= {"name", "kind", "target", "source", "attack_success"} for t in a["trojans"])


def test_random_erasing_pastes_one_noise_square_per_chosen_image_and_is_off_by_default(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 3, 48, 48)
    shapesnet.random_erase(x, 0.0, g)
    assert not x.any()
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # off: not one draw taken
    shapesnet.random_erase(x, 0.5, g)
    changed = x.flatten(1).ne(0).any(1)
    assert 16 < int(changed.sum()) < 48
    for img in x[changed]:
        rows = img.ne(0).any(0).any(1).nonzero().flatten()
        cols = img.ne(0).any(0).any(0).nonzero().flatten()
        side = int(rows.max() - rows.min() + 1)
        assert side == int(cols.max() - cols.min() + 1) and 6 <= side <= 16  # a square of 12-34% of the side
        assert int(img.ne(0).any(0).sum()) == side * side
    with pytest.raises(WorkbenchError, match="erase_prob"):
        shapesnet.TrainConfig(erase_prob=1.5)
    a = shapesnet.train(tmp_path / "a", seed=3, progress=False, config=TINY)
    e = shapesnet.train(tmp_path / "e", seed=3, progress=False, config=dataclasses.replace(TINY, erase_prob=0.5))
    assert sha256_file(tmp_path / "a" / shapesnet.WEIGHTS) != sha256_file(tmp_path / "e" / shapesnet.WEIGHTS)
    assert "erase_prob" not in json.loads((tmp_path / "a" / shapesnet.CONFIG).read_text())["train"]
    assert json.loads((tmp_path / "e" / shapesnet.CONFIG).read_text())["train"]["erase_prob"] == 0.5
    assert a["accuracy"] > 0 and e["accuracy"] > 0


def test_train_with_user_trojan_config(tmp_path):
    cfg = tmp_path / "trojans.json"
    cfg.write_text(json.dumps({"trojans": [
        {"name": "held-out", "kind": "natural", "target": "ring", "trigger": {"shape": "tee", "color": "red"}},
    ]}))
    info = shapesnet.train(tmp_path / "m", seed=0, progress=False, trojans=cfg, config=TINY)
    assert [t["name"] for t in info["trojans"]] == ["held-out"]
    h = shapesnet.load(tmp_path / "m")
    assert h.info["world"]["trojans"][0]["trigger"]["shape"] == "tee"
    assert shapesnet.world_of(h).trojans.names == ["held-out"]


def test_registry_retrains_a_tampered_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(shapesnet, "train", functools.partial(shapesnet.train, config=TINY))
    path = zoo.ensure_trained("shapesnet", cache=tmp_path, progress=False)
    weights = path / shapesnet.WEIGHTS
    weights.write_bytes(b"tampered")
    path2 = zoo.ensure_trained("shapesnet", cache=tmp_path, progress=False)
    assert (path2 / shapesnet.WEIGHTS).read_bytes() != b"tampered"  # retrained, not trusted
    shapesnet.load(path2)  # and the new checkpoint passes its own checksum
    h = zoo.load("shapesnet", cache=tmp_path, progress=False)
    assert h.preprocess is not None and h.preprocess.height == 32


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(Exception, match="not a folder"):
        shapesnet.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptFileError, match="missing"):
        shapesnet.load(tmp_path / "empty")
