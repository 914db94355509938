"""The model zoo: small models trained here on synthetic worlds with known ground truth.

Each zoo model lives in its own module exposing `VERSION`, `DEFAULT_SEED`,
`train(out_dir, *, seed, device, progress) -> info dict` and `load(path, *, device) ->
ModelHandle`. This registry trains a model on first use, caches it under the user cache
(`$WORKBENCH_CACHE` overrides), verifies checksums on every load, and retrains a cache
entry that fails them instead of trusting it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from workbench.devices import resolve_device
from workbench.errors import UnknownModelError
from workbench.handle import ModelHandle
from workbench.storage import atomic_write_json, cache_dir, exclusive_lock, replace_folder, sha256_file

log = logging.getLogger(__name__)

ZOO_MODULES: dict[str, str] = {
    "factgpt": "workbench.zoo.factgpt",
    "factgpt-large": "workbench.zoo.factgpt_large",
    "shapesnet": "workbench.zoo.shapesnet",
}
MANIFEST = "zoo_manifest.json"


def names() -> list[str]:
    return sorted(ZOO_MODULES)


def _module(name: str) -> Any:
    if name not in ZOO_MODULES:
        raise UnknownModelError(f"unknown zoo model {name!r}; the zoo has: {', '.join(names())}")
    return importlib.import_module(ZOO_MODULES[name])


def entry_dir(name: str, *, seed: int | None = None, cache: str | os.PathLike[str] | None = None) -> Path:
    mod = _module(name)
    seed = mod.DEFAULT_SEED if seed is None else seed
    return cache_dir(cache) / "zoo" / f"{name}-v{mod.VERSION}-seed{seed}"


def _verify(path: Path) -> bool:
    """True when the entry's manifest exists and every file matches its recorded sha256."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    for rel, digest in recorded.items():
        f = path / rel
        if not f.is_file() or sha256_file(f) != digest:
            log.warning("zoo cache file %s fails its checksum; retraining", f)
            return False
    return True


def ensure_trained(
    name: str,
    *,
    seed: int | None = None,
    cache: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Path of a verified, trained zoo model; trains it (with a progress bar) when missing."""
    mod = _module(name)
    seed = mod.DEFAULT_SEED if seed is None else seed
    path = entry_dir(name, seed=seed, cache=cache)
    with exclusive_lock(path.with_suffix(".lock")):
        if not force and _verify(path):
            return path
        def fill(tmp: Path) -> None:
            start = time.perf_counter()
            info = dict(mod.train(tmp, seed=seed, device=resolve_device(device), progress=progress))
            info.setdefault("name", name)
            info.setdefault("train_seconds", round(time.perf_counter() - start, 2))
            info["seed"] = seed
            info["version"] = mod.VERSION
            atomic_write_json(tmp / "zoo_info.json", info)
            files = {
                str(f.relative_to(tmp)): sha256_file(f)
                for f in sorted(tmp.rglob("*"))
                if f.is_file() and f.name != MANIFEST
            }
            atomic_write_json(tmp / MANIFEST, {"name": name, "files": files})

        replace_folder(path, fill)
    return path


def info(name: str, **kwargs: Any) -> dict[str, Any]:
    """The training record of a zoo model (accuracy, timing, sizes, trojans...)."""
    path = ensure_trained(name, **kwargs)
    return json.loads((path / "zoo_info.json").read_text())


def load(name: str, *, device: str | torch.device = "cpu", seed: int | None = None,
         cache: str | os.PathLike[str] | None = None, progress: bool = True) -> ModelHandle:
    """Load a zoo model as a ModelHandle, training it first if the cache lacks it."""
    mod = _module(name)
    path = ensure_trained(name, seed=seed, cache=cache, device=device, progress=progress)
    handle: ModelHandle = mod.load(path, device=resolve_device(device))
    handle.info.update(json.loads((path / "zoo_info.json").read_text()))
    return handle
