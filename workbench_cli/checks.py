"""Flag values and output paths, checked before anything is computed.

The argparse `type=` helpers (`finite_float`, `positive_int`, `seed_int`, `threads`, `device`) turn a
bad number into the parser's one-line usage error (exit 2). `new_folder` and `new_file` refuse
an output that exists (results are never written over) or cannot be created; `creatable`
checks only the latter, for run folders that commands resume. All run before a model is loaded.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from workbench.errors import WorkbenchError

MAX_SEED = 2**31 - 1
MAX_THREADS = 1024


def finite_float(text: str) -> float:
    """A float flag: any finite number (NaN and infinities are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give a real value such as 0.5")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def int_list(text: str | None, flag: str, what: str = "integers") -> list[int]:
    """`3,17,40` -> [3, 17, 40]; empty or non-integer text is a one-line error naming the flag."""
    if text is None or not text.replace(",", "").strip():
        raise WorkbenchError(f"{flag} is empty; give comma-separated {what} such as 3,17,40")
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise WorkbenchError(f"{flag} {text!r}: expected comma-separated {what} such as 3,17,40") from None


def int_in(lo: int, hi: int | None = None, what: str = "an integer") -> Callable[[str], int]:
    """An argparse type: an integer in lo..hi (no upper bound when `hi` is None)."""
    def parse(text: str) -> int:
        value = _int(text)
        if value < lo or (hi is not None and value > hi):
            span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{value} is out of range; give {what} {span}")
        return value

    parse.__name__ = what
    return parse


positive_int = int_in(1, None, "a positive integer")
"""A count flag: an integer >= 1."""
seed_int = int_in(0, MAX_SEED, "a seed")
"""A seed flag: what every random generator here accepts."""
threads = int_in(1, MAX_THREADS, "a thread count")
"""A torch CPU thread count."""


def device(text: str) -> str:
    """A --device value: auto, cpu, or a torch device this machine has (cuda, cuda:N)."""
    if text in ("auto", "cpu"):
        return text
    import torch

    from workbench.devices import resolve_device

    try:
        dev = resolve_device(text)
    except WorkbenchError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"device {text!r}: this machine has {torch.cuda.device_count()} CUDA "
                                         "device(s), numbered from cuda:0")
    return text


def creatable(path: str | os.PathLike[str], flag: str, *, given: str | os.PathLike[str] | None = None) -> Path:
    """`path` as a Path, refused unless it is a folder this process can add to, or can be created (its
    nearest existing ancestor is such a folder; tried by creating and removing a temporary folder there).
    `given` is the path the user gave, for the message, when `path` is the folder that will hold it."""
    out = Path(path)
    shown = Path(given) if given is not None else out
    if _exists(out, flag) and not out.is_dir():
        raise WorkbenchError(f"{flag} {shown}: {out} is a file, not a folder")
    missing: list[str] = []
    parent = out.absolute()
    while not _exists(parent, flag):
        missing.append(parent.name)
        parent = parent.parent
    _check_names(shown, missing, parent, flag)
    if not parent.is_dir():
        raise WorkbenchError(f"{flag} {shown}: cannot create it ({parent} is a file, not a folder)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".workbench-check-", dir=parent))
    except OSError as exc:
        raise WorkbenchError(f"{flag} {shown}: cannot create it ({parent} is not a writable folder: "
                             f"{exc.strerror or exc}); give a path in a folder you can write") from None
    return out


def _check_names(out: Path, names: list[str], parent: Path, flag: str) -> None:
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX") if parent.is_dir() else 255
    except (OSError, ValueError):
        limit = 255
    for name in names:
        if len(os.fsencode(name)) > limit:
            raise WorkbenchError(f"{flag} {out}: the name {name[:20]!r}... is longer than {limit} bytes")


def new_folder(path: str | os.PathLike[str] | None, flag: str) -> Path | None:
    """An output folder the command will create: refused when it exists or cannot be created."""
    if path is None:
        return None
    out = Path(path)
    if _exists(out, flag):
        raise WorkbenchError(f"{flag} {out} exists; give a new folder (results are never written over an earlier run)")
    return creatable(out, flag)


def new_file(path: str | os.PathLike[str], flag: str) -> Path:
    """An output file the command will write: refused when it exists or its folder cannot be created."""
    out = Path(path)
    if _exists(out, flag):
        raise WorkbenchError(f"{flag} {out} exists; give a new file name (files are never written over)")
    if str(path).endswith(os.sep) or not out.name:
        raise WorkbenchError(f"{flag} {str(path)!r} names a folder; give a file name")
    creatable(out.parent, flag, given=out)
    _check_names(out, [out.name], out.parent, flag)
    return out


def _exists(path: Path, flag: str) -> bool:
    if "\x00" in str(path):
        raise WorkbenchError(f"{flag} {str(path)!r} is not a usable path (it holds a NUL character)")
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        raise WorkbenchError(f"{flag} {str(path)[:80]!r}{'...' if len(str(path)) > 80 else ''} is not a usable "
                             f"path ({exc.strerror or exc})") from None
    return True
