"""The model zoo: small models trained here on synthetic worlds with known ground truth.

Each zoo model lives in its own module exposing `VERSION`, `DEFAULT_SEED`,
`train(out_dir, *, seed, device, progress) -> info dict` and `load(path, *, device) ->
ModelHandle`. This registry trains a model on first use, caches it under the user cache
(`$WORKBENCH_CACHE` overrides), verifies checksums on every load, and retrains a cache
entry that fails them instead of trusting it.

Specs: `zoo:NAME` is the model at the zoo's seed, `zoo:NAME@SEED` the same recipe at another
seed (trained on first use and cached like the default). Besides the named models, the zoo
trains held-out variants by name (`workbench.zoo.variants`: `factgpt-ARCH-Ll[-plain]`,
`shapesnet-wW`), which are cached only when they pass the zoo's checks. A folder holding a zoo model (a cache
entry, a copy of one, a ShapesNet trained on other trojans) loads with what the zoo attaches:
its world, its measured editor options and its training record (`load_folder`).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from workbench.devices import resolve_device
from workbench.errors import CorruptFileError, UnknownModelError, WorkbenchError
from workbench.handle import ModelHandle
from workbench.storage import atomic_write_json, cache_dir, exclusive_lock, replace_folder, sha256_file

log = logging.getLogger(__name__)

ZOO_MODULES: dict[str, str] = {
    "factgpt": "workbench.zoo.factgpt",
    "factgpt-large": "workbench.zoo.factgpt_large",
    "shapesnet": "workbench.zoo.shapesnet",
}
# Recipes are imported by name (they import the core loader, which imports this registry).
VARIANTS_MODULE = "workbench.zoo.variants"
ARCHITECTURES_MODULE = "workbench.zoo.architectures"  # real sizes, random weights: built on load, never trained
MANIFEST = "zoo_manifest.json"
INFO = "zoo_info.json"
WORLD = "world.json"
EDITOR_DEFAULTS = "editor_defaults.json"  # workbench.models.EDITOR_DEFAULTS_FILE
MAX_SEED = 2**31 - 1


def names() -> list[str]:
    """The zoo's named models (variants are named by pattern: `workbench.zoo.variants.FORMS`)."""
    return sorted(ZOO_MODULES)


def architecture_names() -> list[str]:
    """Real-size architectures with random weights (`workbench.zoo.architectures`), for timing and memory."""
    return importlib.import_module(ARCHITECTURES_MODULE).names()


def is_architecture(name: str) -> bool:
    return name in architecture_names()


def _module(name: str) -> Any:
    """The recipe of a zoo model: its module, or for a variant name the variant (same interface)."""
    if name in ZOO_MODULES:
        return importlib.import_module(ZOO_MODULES[name])
    if is_architecture(name):
        return importlib.import_module(ARCHITECTURES_MODULE)
    variants = importlib.import_module(VARIANTS_MODULE)
    if variants.is_variant_name(name):
        return variants.parse(name)
    raise UnknownModelError(f"unknown zoo model {name!r}; the zoo has: {', '.join(names())}, "
                            f"and variants {' or '.join(variants.FORMS)}; for timing only (random weights): "
                            f"{', '.join(architecture_names())}")


def is_name(name: str) -> bool:
    """Whether `name` names a zoo model (a named one or a well-formed variant)."""
    try:
        _module(name)
    except UnknownModelError:
        return False
    return True


def _check_seed(mod: Any, name: str, seed: Any) -> None:
    low = getattr(mod, "MIN_SEED", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= MAX_SEED:
        raise WorkbenchError(f"seed {seed!r} of zoo model {name}: expected an integer {low}..{MAX_SEED}")


def parse_spec(text: str) -> tuple[str, int | None]:
    """`NAME` or `NAME@SEED` (a spec without its `zoo:`) -> (name, seed; None for the zoo's seed)."""
    name, at, seed = text.strip().partition("@")
    name = name.strip()
    low = getattr(_module(name), "MIN_SEED", 0)
    if not at:
        return name, None
    seed = seed.strip()
    if not re.fullmatch(r"[0-9]+", seed) or not low <= int(seed) <= MAX_SEED:
        raise UnknownModelError(f"zoo:{text.strip()}: the seed after '@' must be an integer {low}..{MAX_SEED}, "
                                f"e.g. zoo:{name}@1")
    return name, int(seed)


def spec_of(name: str, seed: int | None = None) -> str:
    """The spec that names a zoo model: `zoo:NAME`, or `zoo:NAME@SEED` for a chosen seed."""
    return f"zoo:{name}" if seed is None else f"zoo:{name}@{seed}"


def entry_dir(name: str, *, seed: int | None = None, cache: str | os.PathLike[str] | None = None) -> Path:
    mod = _module(name)
    seed = mod.DEFAULT_SEED if seed is None else seed
    _check_seed(mod, name, seed)
    return cache_dir(cache) / "zoo" / f"{name}-v{mod.VERSION}-seed{seed}"


def _manifest_problem(path: Path) -> str | None:
    """What is wrong with a folder's manifest or the files it records (None: all match their sha256)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing"
    try:
        recorded = json.loads(manifest.read_text())["files"]
        items = list(recorded.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{manifest} is not a valid manifest"
    for rel, digest in items:
        f = path / str(rel)
        if not f.is_file() or sha256_file(f) != digest:
            return f"{f} fails its checksum"
    return None


def _verify(path: Path) -> bool:
    """True when the entry's manifest exists and every file matches its recorded sha256."""
    problem = _manifest_problem(path)
    if problem is not None and (path / MANIFEST).is_file():
        log.warning("zoo cache entry %s: %s; retraining", path, problem)
    return problem is None


def ensure_trained(
    name: str,
    *,
    seed: int | None = None,
    cache: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Path of a verified, trained zoo model; trains it (with a progress bar) when missing.

    A recipe whose trained model fails its checks raises (`variants.ZooCheckError`) and leaves the
    cache as it was.
    """
    if is_architecture(name):
        raise WorkbenchError(f"{name} has random weights and is built on load, never trained; load it with "
                             f"workbench.load('zoo:{name}')")
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
            atomic_write_json(tmp / INFO, info)
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
    if is_architecture(name):
        return _module(name).describe(name, seed=kwargs.get("seed"))
    path = ensure_trained(name, **kwargs)
    return json.loads((path / INFO).read_text())


def load(name: str, *, device: str | torch.device = "cpu", seed: int | None = None,
         cache: str | os.PathLike[str] | None = None, progress: bool = True,
         device_map: str | None = None) -> ModelHandle:
    """Load a zoo model as a ModelHandle, training it first if the cache lacks it.

    `device_map="auto"` (accelerate) applies to the architecture models only: the trained zoo
    models fit on one device.
    """
    if is_architecture(name):
        return _module(name).load(name, seed=seed, device=device, device_map=device_map)
    if device_map is not None:
        raise WorkbenchError("device_map applies to Hugging Face models and the architecture models "
                             f"({', '.join(architecture_names())}); trained zoo models fit on one device (use --device)")
    mod = _module(name)
    path = ensure_trained(name, seed=seed, cache=cache, device=device, progress=progress)
    handle: ModelHandle = mod.load(path, device=resolve_device(device))
    handle.info.update(json.loads((path / INFO).read_text()))
    handle.spec = spec_of(name, seed)
    return handle


def listing(cache: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """`workbench zoo list`: each named model at its seed, then every variant (any seed) trained in the cache."""
    rows = []
    for name in names():
        path = entry_dir(name, cache=cache)
        rows.append({"name": name, "spec": spec_of(name), "cached": (path / MANIFEST).is_file(), "path": str(path)})
    for name in architecture_names():
        rows.append({"name": name, "spec": spec_of(name), "cached": None, "path": None,
                     "note": "random weights, built on load: timing and memory only"})
    variants = importlib.import_module(VARIANTS_MODULE)
    folders = cache_dir(cache) / "zoo"
    for folder in sorted(folders.iterdir()) if folders.is_dir() else ():
        found = re.fullmatch(r"(?P<name>.+)-v(?P<version>[0-9]+)-seed(?P<seed>[0-9]+)", folder.name)
        if found is None or not folder.is_dir() or not variants.is_variant_name(found["name"]):
            continue
        name, seed = found["name"], int(found["seed"])
        if not is_name(name) or str(_module(name).VERSION) != found["version"]:
            continue  # a folder of another recipe version, which this workbench never loads
        rows.append({"name": name, "spec": spec_of(name, seed), "cached": (folder / MANIFEST).is_file(),
                     "path": str(folder)})
    return rows


# --- folders ----------------------------------------------------------------------------------

def _read_json(file: Path) -> Any:
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{file} is not valid JSON ({exc}); retrain the model or restore the file") from None


def folder_model(path: str | os.PathLike[str]) -> str | None:
    """The zoo model a folder holds (by its `zoo_info.json`, else by its files), or None.

    A folder with `world.json` beside a ShapesNet `config.json` is a ShapesNet, and beside a
    GPT-2, GPT-NeoX or Llama `config.json` a FactGPT (e.g. an edited FactGPT saved with its world).
    """
    folder = Path(path)
    record = _read_json(folder / INFO)
    if isinstance(record, dict) and isinstance(record.get("name"), str) and is_name(record["name"]):
        return str(record["name"])
    if not (folder / WORLD).is_file():
        return None
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        return None
    if isinstance(config.get("model"), dict):
        return "shapesnet"
    if config.get("model_type") in ("gpt2", "gpt_neox", "llama"):  # factgpt.ARCHS, without importing transformers
        return "factgpt"
    return None


def load_folder(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                spec: str | None = None) -> ModelHandle:
    """Load a folder holding a zoo model as the zoo does: world, editor options, training record.

    A folder with a zoo manifest is checked against it (a file that fails its checksum is an
    error, never silently used).
    """
    folder = Path(path)
    name = folder_model(folder)
    if name is None:
        raise UnknownModelError(f"{folder} holds no zoo model (no {INFO}, or no {WORLD} beside a FactGPT or ShapesNet "
                                "config.json)")
    if (folder / MANIFEST).is_file():
        problem = _manifest_problem(folder)
        if problem is not None:
            raise CorruptFileError(f"{problem}; retrain it (workbench zoo train {name}) or restore the folder")
    handle: ModelHandle = _module(name).load(folder, device=resolve_device(device))
    record = _read_json(folder / INFO)
    if isinstance(record, dict):
        handle.info.update(record)
    handle.spec = str(folder) if spec is None else spec
    return handle


def folder_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a model folder says about itself: its training record (`zoo_info.json`), else its config."""
    folder = Path(path)
    if not folder.is_dir():
        raise UnknownModelError(f"no model folder at {str(path)!r}")
    record = _read_json(folder / INFO)
    config = _read_json(folder / "config.json")
    if isinstance(record, dict):
        out = dict(record)
    elif isinstance(config, dict) and isinstance(config.get("model"), dict):
        out = {"name": "shapesnet", "seed": config.get("seed"), "version": config.get("version"),
               "model": config["model"], "train": config.get("train")}
    elif isinstance(config, dict):
        keys = ("model_type", "n_layer", "num_hidden_layers", "n_embd", "hidden_size", "n_head", "num_attention_heads",
                "vocab_size")
        out = {"name": folder_model(folder) or config.get("model_type"), **{k: config[k] for k in keys if k in config}}
    else:
        raise UnknownModelError(f"{folder} is not a model folder: it has neither {INFO} nor config.json")
    out.setdefault("accuracy", None)
    out["zoo_model"] = folder_model(folder)
    out["world"] = (folder / WORLD).is_file()
    shipped = _read_json(folder / EDITOR_DEFAULTS)
    if shipped is None and str(out["zoo_model"]).startswith("factgpt") and out["world"]:  # what factgpt.load attaches
        shipped = _module("factgpt").shipped_editor_defaults(folder)
    out["editor_defaults"] = ", ".join(sorted(shipped)) if isinstance(shipped, dict) else ""
    out["path"] = str(folder)
    return out


def describe(target: str, *, seed: int | None = None, cache: str | os.PathLike[str] | None = None,
             device: str | torch.device = "cpu") -> dict[str, Any]:
    """`workbench zoo info`: the record of a zoo model (`NAME`, `NAME@SEED`, `zoo:...`) or of a model folder."""
    if Path(target).expanduser().is_dir():
        if seed is not None:
            raise WorkbenchError(f"--seed applies to zoo model names; {target} is a folder, which holds one model")
        return folder_info(Path(target).expanduser())
    if target.startswith((".", "/", "~")) or os.sep in target:
        raise UnknownModelError(f"no model folder at {target!r}; give a folder or a zoo model ({', '.join(names())})")
    name, at_seed = parse_spec(target.removeprefix("zoo:"))
    if at_seed is not None and seed is not None and at_seed != seed:
        raise WorkbenchError(f"{target} names seed {at_seed} but --seed is {seed}; give one")
    seed = at_seed if at_seed is not None else seed
    result = info(name, seed=seed, cache=cache, device=device)
    result["path"] = None if is_architecture(name) else str(entry_dir(name, seed=seed, cache=cache))
    return result
