"""The workspace folder: which models are open, their stack of edits, and exports.

    WORKSPACE/
      .workbench-app.lock          held while a server uses the workspace (one server at a time)
      stacks/<key>/model.json      the spec and the fingerprint of the unedited weights
      stacks/<key>/stack.json      the edits applied, in order (the truth after a restart)
      stacks/<key>/deltas/<id>.safetensors
      jobs/<id>/                   one run folder per job (see `workbench_app.jobs`)
      exports/...                  stacks exported as deltas (any new folder the user names)
      models/...                   the user's model folders (config.json + *.safetensors), any folder name

An edit's delta is written before it is applied and `stack.json` after, both atomically; an
undo writes `stack.json` first. A server killed at any moment therefore restarts with the
model as `stack.json` says: the original weights with exactly those deltas applied again,
which WeightDelta's fingerprints check.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from workbench.delta import WeightDelta
from workbench.errors import UnknownModelError, WorkbenchError
from workbench.fingerprint import model_fingerprint
from workbench.storage import atomic_write_json, fill_new_folder, held_lock
from workbench_app.security import inside, relative_to_workspace

log = logging.getLogger(__name__)

LOCK = ".workbench-app.lock"
STACKS = "stacks"
MODEL_JSON = "model.json"
STACK_JSON = "stack.json"
EXPORT_MANIFEST = "stack.json"
ZOO_CHOICES = ("zoo:factgpt", "zoo:shapesnet")
_KEY = re.compile(r"^[a-z0-9][a-z0-9._-]{0,80}-[0-9a-f]{8}$")
_DELTA = re.compile(r"^deltas/[0-9a-z-]{1,64}\.safetensors$")


class ConflictError(WorkbenchError):
    """The request is valid but the state forbids it now (a job runs, a later edit must go first): HTTP 409."""


def model_key(spec: str) -> str:
    """A URL- and file-safe key for a model spec: readable stem plus a hash of the exact spec."""
    stem = re.sub(r"[^a-z0-9._]+", "-", spec.lower()).strip("-.")[:60] or "model"
    return f"{stem}-{hashlib.sha256(spec.encode('utf-8')).hexdigest()[:8]}"


def read_json(path: Path, default: Any) -> Any:
    """A JSON file of the workspace, or `default` when it is missing; a file that does not parse is an error."""
    import json

    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        from workbench.errors import CorruptFileError

        raise CorruptFileError(f"{path} is not valid JSON ({exc}); restore it or remove the folder {path.parent}") from None


class OpenModel:
    """One open model: loaded on first use, its edits applied from `stack.json`, guarded by one lock."""

    def __init__(self, workspace: Workspace, key: str, spec: str, folder: str | None) -> None:
        self.workspace = workspace
        self.key = key
        self.spec = spec
        self.folder = folder  # workspace-relative folder, or None for a zoo model
        self.dir = workspace.root / STACKS / key
        self.lock = threading.RLock()
        self.handle: Any = None
        self.original_fingerprint: str | None = None
        self._stack: list[tuple[dict[str, Any], WeightDelta]] = []
        self._fingerprint: str | None = None
        self._static: dict[str, Any] | None = None

    # --- loading ------------------------------------------------------------------------

    def _load_handle(self) -> Any:
        from workbench.models import load

        if self.folder is not None:
            return load(str(inside(self.workspace.root, self.folder, what="model folder")), device=self.workspace.device,
                        progress=False)
        from workbench import zoo

        name, seed = zoo.parse_spec(self.spec.removeprefix("zoo:"))
        if not (zoo.entry_dir(name, seed=seed, cache=self.workspace.cache) / zoo.MANIFEST).is_file():
            raise UnknownModelError(f"{self.spec} is not trained yet on this machine; train it first with "
                                    f"`workbench zoo train {zoo.spec_of(name, seed).removeprefix('zoo:')}` (minutes), "
                                    "then open it here")
        return zoo.load(name, seed=seed, cache=self.workspace.cache, device=self.workspace.device, progress=False)

    def ensure_loaded(self) -> Any:
        """The handle, loading the model and re-applying the stored stack the first time."""
        with self.lock:
            if self.handle is not None:
                return self.handle
            handle = self._load_handle()
            original = model_fingerprint(handle.model)
            record = read_json(self.dir / MODEL_JSON, None)
            if record is not None and record.get("original_fingerprint") not in (None, original):
                raise ConflictError(
                    f"{self.spec} has other weights than when its edits were made in this workspace (fingerprint "
                    f"{original[:16]}…, recorded {str(record['original_fingerprint'])[:16]}…); its stored edits cannot "
                    f"be applied. Move {relative_to_workspace(self.workspace.root, self.dir)} aside to start afresh")
            atomic_write_json(self.dir / MODEL_JSON, {"spec": self.spec, "folder": self.folder, "key": self.key,
                                                      "original_fingerprint": original,
                                                      "opened": (record or {}).get("opened", time.time())})
            stack: list[tuple[dict[str, Any], WeightDelta]] = []
            try:
                for entry in read_json(self.dir / STACK_JSON, []):
                    delta = WeightDelta.load(self.delta_path(entry))
                    delta.apply(handle.model)
                    stack.append((entry, delta))
            except BaseException:
                for _, delta in reversed(stack):
                    delta.revert(handle.model)
                raise
            self.handle, self.original_fingerprint, self._stack = handle, original, stack
            self._fingerprint = None
            return handle

    def delta_path(self, entry: dict[str, Any]) -> Path:
        """Where an entry's delta lies; a `stack.json` naming any other file is refused."""
        rel = entry.get("delta") if isinstance(entry, dict) else None
        if not isinstance(rel, str) or not _DELTA.match(rel):
            from workbench.errors import CorruptFileError

            raise CorruptFileError(f"{self.dir / STACK_JSON} names the delta file {rel!r}, which is not one the app "
                                   "writes (deltas/<id>.safetensors); restore the file or remove the folder")
        return self.dir / rel

    @property
    def loaded(self) -> bool:
        return self.handle is not None

    # --- state --------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """sha256 of every parameter and buffer as they are now (edits included); cached between changes."""
        cached = self._fingerprint
        if cached is not None:
            return cached
        with self.lock:
            self.ensure_loaded()
            if self._fingerprint is None:
                self._fingerprint = model_fingerprint(self.handle.model)
            return self._fingerprint

    def stack(self) -> list[dict[str, Any]]:
        """The edits applied, oldest first (read without waiting for a running job)."""
        if self.handle is None:
            return list(read_json(self.dir / STACK_JSON, []))
        return [dict(entry) for entry, _ in list(self._stack)]

    def _write_stack(self, entries: list[dict[str, Any]]) -> None:
        atomic_write_json(self.dir / STACK_JSON, entries)

    @contextmanager
    def compute(self) -> Iterator[Any]:
        """Hold the model for a computation (jobs, answers); yields the loaded handle."""
        with self.lock:
            yield self.ensure_loaded()

    def push(self, delta: WeightDelta, entry: dict[str, Any]) -> dict[str, Any]:
        """Save `delta`, apply it on top of the stack and record it; returns the stack entry."""
        with self.lock:
            self.ensure_loaded()
            edit_id = str(entry["id"])
            if not re.fullmatch(r"[0-9a-z-]{1,64}", edit_id):
                raise WorkbenchError(f"edit id {edit_id!r} is not a job id")
            before = self.fingerprint()
            rel = f"deltas/{edit_id}.safetensors"
            delta.save(self.dir / rel)
            self._fingerprint = None
            delta.apply(self.handle.model)
            try:
                after = self.fingerprint()
                full = {**entry, "delta": rel, "fingerprint_before": before, "fingerprint_after": after,
                        "norms": delta.norms(), "created": time.time()}
                self._write_stack([e for e, _ in self._stack] + [full])
            except BaseException:
                delta.revert(self.handle.model)
                self._fingerprint = None
                raise
            self._stack.append((full, delta))
            return dict(full)

    def undo(self, edit_id: str) -> dict[str, Any]:
        """Revert the top edit bit-exactly (a lower one would need the later ones refitted: refused)."""
        with self.lock:
            self.ensure_loaded()
            ids = [e["id"] for e, _ in self._stack]
            if edit_id not in ids:
                raise UnknownModelError(f"edit {edit_id!r} is not in the stack of {self.spec}; the stack holds "
                                        f"{', '.join(ids) or 'no edits'}")
            if ids[-1] != edit_id:
                later = ids[ids.index(edit_id) + 1:]
                raise ConflictError(f"edit {edit_id} has later edits on top ({', '.join(later)}), which were fitted on "
                                    "the model with it applied; undo those first (last in, first out)")
            entry, delta = self._stack[-1]
            self._write_stack([e for e, _ in self._stack[:-1]])
            self._fingerprint = None
            try:
                delta.revert(self.handle.model)
            except BaseException:
                self._write_stack([e for e, _ in self._stack])
                raise
            self._stack.pop()
            self._fingerprint = None
            now = self.fingerprint()
            return {"undone": dict(entry), "fingerprint": now, "bit_exact": now == entry["fingerprint_before"],
                    "original": now == self.original_fingerprint, "stack": self.stack()}

    def export(self, folder: str) -> dict[str, Any]:
        """Copy the stack's deltas and a manifest into a new folder inside the workspace."""
        with self.lock:
            entries = self.stack()
            if not entries:
                raise WorkbenchError(f"{self.spec} has no edits to export; make an edit first")
            out = inside(self.workspace.root, folder, what="export folder")
            if out.exists():
                raise WorkbenchError(f"export folder {folder!r} exists; give a new folder (exports never overwrite)")

            def fill(tmp: Path) -> None:
                files = []
                for i, entry in enumerate(entries):
                    name = f"{i:03d}-{entry['id']}.safetensors"
                    (tmp / name).write_bytes(self.delta_path(entry).read_bytes())
                    files.append({**entry, "delta": name})
                atomic_write_json(tmp / EXPORT_MANIFEST, {"model": self.spec, "original_fingerprint":
                                                          self.original_fingerprint, "edits": files})

            fill_new_folder(out, fill)
            return {"folder": relative_to_workspace(self.workspace.root, out), "files": len(entries) + 1}

    def save_model(self, folder: str) -> dict[str, Any]:
        """Write the model as it is now (edits applied) with `save_pretrained` into a new workspace folder.

        Safetensors weights, the tokenizer, the shipped editor options and the world (zoo models), so
        the folder opens again here, or anywhere with `workbench.load`, as an edited model.
        """
        from workbench.models import EDITOR_DEFAULTS_FILE, transformers_progress_bars

        out = inside(self.workspace.root, folder, what="model folder")
        if out.exists():
            raise WorkbenchError(f"model folder {folder!r} exists; give a new folder (saves never overwrite)")
        with self.lock:
            h = self.ensure_loaded()
            if not hasattr(h.model, "save_pretrained"):
                raise WorkbenchError(f"{self.spec} is not a Hugging Face model; export its edits as deltas instead")
            entries = self.stack()

            def fill(tmp: Path) -> None:
                with transformers_progress_bars(False):
                    h.model.save_pretrained(tmp, safe_serialization=True)
                if h.tokenizer is not None:
                    h.tokenizer.save_pretrained(tmp)
                if h.info.get("editor_defaults"):
                    atomic_write_json(tmp / EDITOR_DEFAULTS_FILE, h.info["editor_defaults"])
                if hasattr(h.world, "save"):
                    h.world.save(tmp / "world.json")
                atomic_write_json(tmp / "workbench_edits.json", {"model": self.spec, "original_fingerprint":
                                                                 self.original_fingerprint, "edits": entries})

            fill_new_folder(out, fill)
            return {"folder": relative_to_workspace(self.workspace.root, out), "edits": len(entries),
                    "fingerprint": self.fingerprint()}

    def describe(self) -> dict[str, Any]:
        """What the Model page shows: architecture, sites, accuracy, fingerprints, the stack."""
        static = self._static  # read without the lock: a page must not wait for a running job
        if static is None:
            with self.lock:
                if self._static is None:
                    self._static = self._describe_static(self.ensure_loaded())
                static = self._static
        fingerprint = self._fingerprint or self.fingerprint()  # cached except just after an edit or undo
        return {**static, "fingerprint": fingerprint, "original_fingerprint": self.original_fingerprint,
                "stack": [dict(entry) for entry, _ in list(self._stack)]}

    def _describe_static(self, h: Any) -> dict[str, Any]:
        """The parts of the description that no edit changes (computed once)."""
        from workbench.sites import list_sites

        arch = h.arch
        sites = list_sites(h)
        canonical = [{"name": s.name, "module_path": s.module_path, "side": s.side, "layer": s.layer}
                     for s in sites if s.canonical]
        modules = [s.name for s in sites if not s.canonical]
        info = {k: v for k, v in h.info.items() if isinstance(v, (int, float, str, bool)) or v is None}
        n_params = sum(p.numel() for p in h.model.parameters())
        return {
            "key": self.key, "spec": self.spec, "folder": self.folder, "kind": h.kind,
            "architecture": {"family": arch.family, "n_layers": arch.n_layers, "d_model": arch.d_model,
                             "d_mlp": arch.d_mlp, "n_heads": arch.n_heads, "vocab_size": arch.vocab_size,
                             "n_params": n_params},
            "accuracy": h.info.get("accuracy"),
            "info": info,
            "editor_defaults": h.info.get("editor_defaults") or {},
            "classes": list(h.preprocess.class_names) if h.preprocess is not None else [],
            "has_world": h.world is not None,
            "can_edit_facts": h.kind == "causal_lm" and h.tokenizer is not None,
            "sites": canonical,
            "module_sites": modules[:400],
            "n_module_sites": len(modules),
        }


class Workspace:
    """The folder a server works in; holds its lock for the server's lifetime."""

    def __init__(self, root: str | Path, *, device: str = "cpu", cache: str | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.cache = cache
        self._open: dict[str, OpenModel] = {}
        self._lock = threading.Lock()
        self._held: Any = None

    def acquire(self) -> None:
        """Take the workspace's lock (another live server on the same folder is refused)."""
        from workbench.errors import LockHeldError

        cm = held_lock(self.root / LOCK, {"pid": __import__("os").getpid(), "started": time.time()})
        try:
            cm.__enter__()
        except LockHeldError as exc:
            raise WorkbenchError(f"workspace {self.root} is in use by another server (pid {exc.holder.get('pid', '?')});"
                                 " stop it or give another --workspace") from None
        self._held = cm

    def release(self) -> None:
        if self._held is not None:
            self._held.__exit__(None, None, None)
            self._held = None

    # --- models ---------------------------------------------------------------------------

    def open(self, *, spec: str | None = None, folder: str | None = None) -> OpenModel:
        """The open model of a zoo spec or of a model folder inside the workspace, loaded."""
        if (spec is None) == (folder is None):
            raise WorkbenchError("give either a zoo model spec (e.g. zoo:factgpt) or a folder inside the workspace")
        if spec is not None:
            spec = spec.strip()
            if not spec.startswith("zoo:"):
                raise UnknownModelError(f"model {spec!r}: the app opens zoo models ({', '.join(ZOO_CHOICES)}, or "
                                        "zoo:NAME@SEED) or a model folder inside the workspace")
            from workbench import zoo

            name, seed = zoo.parse_spec(spec.removeprefix("zoo:"))  # unknown names raise the CLI's message
            spec = zoo.spec_of(name, seed)
        else:
            path = inside(self.root, str(folder), what="model folder")
            if not path.is_dir():
                raise UnknownModelError(f"no model folder at {folder!r} inside the workspace; folders there: "
                                        f"{', '.join(self.model_folders()) or 'none'}")
            folder = relative_to_workspace(self.root, path)
            spec = f"folder:{folder}"
        key = model_key(spec)
        with self._lock:
            model = self._open.get(key)
            if model is None:
                model = OpenModel(self, key, spec, folder)
                self._open[key] = model
        try:
            model.ensure_loaded()
        except BaseException:
            with self._lock:
                if model.handle is None and self._open.get(key) is model:
                    del self._open[key]
            raise
        return model

    def get(self, key: str) -> OpenModel:
        """An open model by key; one opened by an earlier server in this workspace is reopened."""
        if not isinstance(key, str) or not _KEY.match(key):
            raise UnknownModelError(f"unknown model {key!r}; open one first (POST /api/models)")
        with self._lock:
            model = self._open.get(key)
        if model is not None:
            return model
        record = read_json(self.root / STACKS / key / MODEL_JSON, None)
        if not isinstance(record, dict) or "spec" not in record:
            raise UnknownModelError(f"unknown model {key!r}; open one first (POST /api/models)")
        folder = record.get("folder")
        return self.open(spec=None if folder else record["spec"], folder=folder)

    def opened(self) -> list[dict[str, Any]]:
        """Models opened in this workspace (now or by an earlier server), with their stack depth."""
        out = []
        models = self.root / STACKS
        for d in sorted(models.iterdir()) if models.is_dir() else ():
            record = read_json(d / MODEL_JSON, None)
            if isinstance(record, dict) and "spec" in record:
                with self._lock:
                    loaded = d.name in self._open and self._open[d.name].loaded
                out.append({"key": d.name, "spec": record["spec"], "loaded": loaded,
                            "edits": len(read_json(d / STACK_JSON, []))})
        return out

    def model_folders(self, *, depth: int = 3) -> list[str]:
        """Folders inside the workspace that hold a model (config.json and safetensors weights)."""
        found: list[str] = []

        def walk(d: Path, level: int) -> None:
            if level > depth or len(found) >= 200:
                return
            if (d / "config.json").is_file() and any(d.glob("*.safetensors")):
                found.append(relative_to_workspace(self.root, d))
                return
            for child in sorted(d.iterdir()):
                if child.is_dir() and not child.name.startswith(".") and child.name not in ("jobs", STACKS):
                    walk(child, level + 1)

        walk(self.root, 0)
        return found

    def choices(self) -> dict[str, Any]:
        """What the model picker offers: trained zoo models, model folders, models already open."""
        from workbench import zoo

        rows = [r for r in zoo.listing(self.cache) if r["cached"]]
        return {"zoo": [{"spec": r["spec"], "cached": r["cached"]} for r in rows],
                "folders": self.model_folders(), "opened": self.opened()}


