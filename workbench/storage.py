"""Atomic file writes, checksums and the user cache directory.

Results, caches and zoo checkpoints are written to a temporary file in the same folder
and renamed into place, so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CACHE_ENV = "WORKBENCH_CACHE"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The workbench cache: `override`, else `$WORKBENCH_CACHE`, else `~/.cache/workbench`."""
    if override is not None:
        path = Path(override)
    elif os.environ.get(CACHE_ENV):
        path = Path(os.environ[CACHE_ENV])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "workbench"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as exc:
        from workbench.errors import WorkbenchError

        raise WorkbenchError(f"cache folder {str(path)!r} cannot be created ({exc}); give a writable folder with "
                             f"--cache or ${CACHE_ENV}") from None
    return path


def cache_subdir(cache: bool | str | os.PathLike[str], name: str) -> Path | None:
    """`cache_dir()/name` (created) for `cache=True`, `PATH/name` for a folder, None for `cache=False` (no caching)."""
    if cache is False:
        return None
    root = cache_dir(None if cache is True else cache) / name
    root.mkdir(parents=True, exist_ok=True)
    return root


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then rename tmp_path onto `path` (same folder, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a result file should read like any other
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def fill_new_folder(path: str | os.PathLike[str], fill: Callable[[Path], T]) -> T:
    """Call `fill(tmp_folder)` and rename the folder onto `path` only when it returns.

    `path` must not exist: a folder is never overwritten, and an interrupted or failing
    `fill` leaves nothing at `path` (the hidden temporary sibling is removed).
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; give a new folder (it is never overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        result = fill(tmp)
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def replace_folder(path: str | os.PathLike[str], fill: Callable[[Path], T]) -> T:
    """Call `fill(tmp_folder)`; only when it returns, the folder takes `path`'s place.

    Unlike `fill_new_folder`, an existing folder at `path` is replaced, but never lost early:
    it is moved aside, the new folder renamed in, and only then removed (restored if the rename
    fails). An interrupted or failing `fill` leaves `path` as it was.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    old: Path | None = None
    try:
        result = fill(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rename(path, old / path.name)
        try:
            os.rename(tmp, path)
        except OSError:
            if old is not None:
                os.rename(old / path.name, path)
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return result


@contextmanager
def exclusive_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file `path` (created if missing) for the block.

    The kernel drops the lock when its holder exits, however it exits, so a killed process
    never leaves a stale lock behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def held_lock(path: str | os.PathLike[str], holder: dict[str, Any]) -> Iterator[None]:
    """Take the exclusive lock on `path` without waiting, and record `holder` (JSON) in the file.

    Raises `LockHeldError` at once, carrying what the current holder recorded, when another
    process (or another open of the file) holds it. The kernel drops the lock when its holder
    exits, however it exits, so a killed holder never leaves it stale; the record is emptied
    on release and only read while the lock is held.
    """
    from workbench.errors import LockHeldError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            found = _read_holder(fh)
            raise LockHeldError(f"{path} is locked by pid {found.get('pid', '?')}", path=str(path), holder=found) from None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps(holder, sort_keys=True, default=json_default))
            fh.flush()
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_holder(fh: Any, tries: int = 10) -> dict[str, Any]:
    """The holder's record; retried briefly, since a new holder writes it just after locking."""
    import time

    for attempt in range(tries):
        fh.seek(0)
        try:
            found = json.loads(fh.read())
        except ValueError:
            found = None
        if isinstance(found, dict):
            return found
        if attempt < tries - 1:
            time.sleep(0.02)
    return {}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, _write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write `obj` as JSON; NaN and infinities become null (JSON has no such numbers)."""
    return atomic_write_text(path, json_text(obj, indent=2) + "\n")


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)` for tensors and arrays (as lists) and paths (as strings)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__} to JSON")


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN or infinite float (in dicts, lists, tuples, tensors and arrays) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return json_safe(obj.tolist())
    return obj


def json_text(obj: Any, *, default: Callable[[Any], Any] = json_default, **kwargs: Any) -> str:
    """Strict JSON of `obj` (sorted keys): non-finite numbers as null, never the non-JSON `NaN`/`Infinity`."""
    return json.dumps(json_safe(obj), sort_keys=True, allow_nan=False, default=default, **kwargs)


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object in canonical form (sorted keys, no whitespace)."""
    text = json_text(obj, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- checked safetensors files (deltas, statistics caches) ---------------------------------

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
_SAFETENSORS_META_KEY = "workbench"
_SAFETENSORS_SHA_KEY = "workbench_sha256"


def looks_like_pickle(path: str | os.PathLike[str]) -> bool:
    """True for a pickle stream or a `torch.save` zip archive (detected by magic bytes).

    A safetensors file starts with its header's length (8 bytes, little-endian) and then `{`;
    a header of 384, 640, ... bytes begins with the pickle magic `0x80 0x01..0x05`, so a
    plausible safetensors start is recognized first.
    """
    with open(path, "rb") as fh:
        head = fh.read(9)
        size = os.fstat(fh.fileno()).st_size
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return False
    return (len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5) or head[:4] == b"PK\x03\x04"


def _safetensors_checksum(tensors: Any, metadata_json: str) -> str:
    from workbench.fingerprint import tensor_digest

    h = hashlib.sha256()
    h.update(metadata_json.encode("utf-8"))
    for name in sorted(tensors):
        h.update(b"\0" + name.encode("utf-8") + b"\0")
        h.update(tensor_digest(tensors[name]).encode())
    return h.hexdigest()


def safetensors_bytes(tensors: Any, metadata: dict[str, str] | None = None) -> bytes:
    """Serialize tensors as safetensors with a canonical (key-sorted) header.

    The safetensors writer keeps `metadata` in a hash map, so two saves of the same tensors
    can order the header differently and hash differently. Rewriting the header with sorted
    keys (tensor offsets are unaffected) makes the same weights always give the same bytes,
    which is what a sha256 fingerprint of a trained model needs.
    """
    from safetensors.torch import save

    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    raw = save(cpu, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # keep the data section 8-byte aligned, as the format asks
    return len(header).to_bytes(8, "little") + header + raw[8 + n:]


def save_safetensors(path: str | os.PathLike[str], tensors: Any, metadata: dict[str, str] | None = None) -> Path:
    """Atomically write tensors as deterministic safetensors bytes (see `safetensors_bytes`)."""
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def save_safetensors_checked(path: str | os.PathLike[str], tensors: Any, metadata: Any) -> Path:
    """Atomically write `tensors` (name -> Tensor) as safetensors with JSON `metadata`.

    The header's `__metadata__` holds the JSON and a sha256 over it and every tensor, so
    `load_safetensors_checked` detects truncation and tampering of data and metadata alike.
    """
    cpu = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    meta_json = json_text(metadata, separators=(",", ":"))
    header = {_SAFETENSORS_META_KEY: meta_json, _SAFETENSORS_SHA_KEY: _safetensors_checksum(cpu, meta_json)}
    return save_safetensors(path, cpu, header)


def load_safetensors_checked(path: str | os.PathLike[str], *, what: str = "file") -> tuple[dict[str, Any], Any]:
    """Read a file written by `save_safetensors_checked`: (tensors on CPU, metadata).

    Never unpickles: a pickle / `torch.save` file raises `UnsafeFileError`; a truncated,
    unparsable or tampered file raises `CorruptFileError`.
    """
    from safetensors.torch import load as load_bytes

    from workbench.errors import CorruptFileError, UnsafeFileError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if looks_like_pickle(path):
        raise UnsafeFileError(
            f"{what} {path} is a pickle/torch.save file; the workbench never unpickles files "
            "(they can run arbitrary code). Expected a safetensors file written by the workbench."
        )
    data = path.read_bytes()
    try:
        if len(data) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(data[:8], "little")
        if n > len(data) - 8:
            raise ValueError(f"header claims {n} bytes but the file has {len(data) - 8} after the length")
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != len(data):
            raise ValueError(f"payload is {len(data) - 8 - n} bytes, header describes {end}")
        meta = header.get("__metadata__") or {}
        meta_json, checksum = meta[_SAFETENSORS_META_KEY], meta[_SAFETENSORS_SHA_KEY]
        tensors = load_bytes(data)
        metadata = json.loads(meta_json)
    except Exception as exc:  # any parse failure means the file cannot be trusted
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise UnsafeFileError(
                f"{what} {path} is not a workbench safetensors file and its suffix {path.suffix!r} "
                "suggests a pickle; the workbench never unpickles files."
            ) from exc
        raise CorruptFileError(
            f"{what} {path} is truncated or not a workbench safetensors file ({exc}); delete it and recreate it"
        ) from exc
    if _safetensors_checksum(tensors, meta_json) != checksum:
        raise CorruptFileError(
            f"{what} {path} fails its sha256 check (tensors or metadata were modified after writing); "
            "delete it and recreate it"
        )
    return tensors, metadata
