"""Atomic writes, checksums, cache location, device resolution, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from workbench.devices import resolve_device
from workbench.errors import WorkbenchError
from workbench.fingerprint import model_fingerprint, parameter_fingerprint, tensor_digest
from workbench.registry import Registry
from workbench.storage import atomic_write, atomic_write_json, cache_dir, fill_new_folder, sha256_file, sha256_json


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path: Path) -> None:
    target = tmp_path / "result.json"
    atomic_write_json(target, {"a": 1})

    def broken(tmp: Path) -> None:
        tmp.write_text("{partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp file left


def test_sha256_json_is_canonical() -> None:
    assert sha256_json({"b": 1, "a": [1, 2]}) == sha256_json({"a": [1, 2], "b": 1})
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})


def test_sha256_file_changes_with_content(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    first = sha256_file(f)
    f.write_bytes(b"abd")
    assert sha256_file(f) != first


def test_cache_dir_override_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "env-cache"))
    assert cache_dir() == tmp_path / "env-cache"
    assert cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert (tmp_path / "explicit").is_dir()


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda"}
    with pytest.raises(WorkbenchError, match="expected cpu, cuda"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(WorkbenchError, match="CUDA is not available"):
            resolve_device("cuda")


def test_fingerprints_see_one_bit() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    before = model_fingerprint(model)
    only_first = parameter_fingerprint(model, ["0.weight"])
    with torch.no_grad():
        bits = model[2].weight.view(torch.int32)
        bits[0, 0] ^= 1  # flip the lowest mantissa bit of one weight
    assert model_fingerprint(model) != before
    assert parameter_fingerprint(model, ["0.weight"]) == only_first
    assert tensor_digest(torch.zeros(2, 3)) != tensor_digest(torch.zeros(3, 2))
    with pytest.raises(KeyError, match="no parameter"):
        parameter_fingerprint(model, ["missing.weight"])


def test_registry_lists_valid_names_on_unknown() -> None:
    reg: Registry[type] = Registry("widget")

    @reg.register("alpha")
    class Alpha:  # noqa: D401 - test class
        pass

    assert reg.get("alpha") is Alpha
    with pytest.raises(WorkbenchError, match="available: alpha"):
        reg.get("beta")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("alpha")(type("Other", (), {}))


def test_atomic_writes_follow_the_umask(tmp_path):
    import os

    from workbench.storage import atomic_write_text

    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "report.html", "<html></html>")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644  # not mkstemp's 0600: reports are meant to be read


def test_fill_new_folder_renames_only_a_complete_folder_and_never_overwrites(tmp_path: Path) -> None:
    def fail(folder: Path) -> None:
        (folder / "half.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        fill_new_folder(tmp_path / "m", fail)
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary sibling left behind
    assert fill_new_folder(tmp_path / "m", lambda folder: (folder / "w.txt").write_text("ok")) == 2
    assert (tmp_path / "m" / "w.txt").read_text() == "ok" and len(list(tmp_path.iterdir())) == 1
    with pytest.raises(FileExistsError, match="never overwritten"):
        fill_new_folder(tmp_path / "m", lambda folder: None)
    assert (tmp_path / "m" / "w.txt").read_text() == "ok"


@pytest.mark.parametrize("header_bytes", [384, 640, 1408])
def test_safetensors_header_length_that_starts_like_a_pickle_still_loads(tmp_path: Path, header_bytes: int) -> None:
    from workbench.storage import load_safetensors_checked, looks_like_pickle, save_safetensors_checked

    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    for pad in range(2000):
        path = save_safetensors_checked(tmp_path / "f.safetensors", tensors, {"pad": "x" * pad})
        if int.from_bytes(path.read_bytes()[:8], "little") == header_bytes:
            break
    else:
        pytest.fail(f"no padding gave a {header_bytes}-byte header")
    assert path.read_bytes()[:2] in (b"\x80\x01", b"\x80\x02", b"\x80\x05")  # the pickle magic
    assert not looks_like_pickle(path)
    loaded, meta = load_safetensors_checked(path)
    assert torch.equal(loaded["w"], tensors["w"]) and meta["pad"] == "x" * pad


def _strict(text: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_stored_json_writes_null_for_nan_and_infinity(tmp_path: Path) -> None:
    obj = {"a": float("nan"), "b": [1.0, float("inf"), (float("-inf"),)], "t": torch.tensor([0.5, float("nan")]),
           "p": tmp_path, "ok": 2.5}
    written = _strict(atomic_write_json(tmp_path / "x.json", obj).read_text())
    assert written == {"a": None, "b": [1.0, None, [None]], "t": [0.5, None], "p": str(tmp_path), "ok": 2.5}
    assert sha256_json(obj) == sha256_json(written)
    assert sha256_json({"x": [1, 2.5, "s"]}) == sha256_json({"x": (1, 2.5, "s")})


def test_cache_dir_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(WorkbenchError, match="cannot be created"):
        cache_dir(blocker / "cache")
