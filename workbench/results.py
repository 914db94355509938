"""The run folder: config, prediction, one JSON per case, artifacts, summary.

Every file is written atomically (temporary file, then rename), one case per file, so a
run killed at any moment leaves only complete cases behind. Rerunning with the same
config resumes: finished cases are skipped, missing ones are computed, none is duplicated
or lost. A rerun with a different config is refused rather than mixing two experiments.

    run_dir/
      config.json         what was asked (must match on resume)
      prediction.json     written before any case runs (must match on resume)
      cases/<id>.json     {"case_id": ..., "record": ...}, one per case
      summary.json        aggregate numbers
      <artifacts>         plots, report.html, ...
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from workbench.errors import CorruptFileError, WorkbenchError
from workbench.progress import progress_bar
from workbench.storage import atomic_write_bytes, atomic_write_json, atomic_write_text, json_text, sha256_json

_SAFE = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_MAX_NAME = 180  # file names stay well under the usual 255-byte limit


def encode_case_id(case_id: str) -> str:
    """A file-name-safe, reversible, case-insensitive-file-system-safe encoding of `case_id`.

    Lower-case letters, digits, `-`, `_` and `.` (not leading) stay; every other byte of the
    UTF-8 form becomes `%XX`. Over-long ids end in `~` + a sha256 prefix (then not reversible
    from the name; the id is inside the file).
    """
    out = []
    for i, byte in enumerate(case_id.encode("utf-8")):
        ch = chr(byte)
        out.append(ch if ch in _SAFE and not (i == 0 and ch == ".") else f"%{byte:02X}")
    name = "".join(out)
    if len(name) > _MAX_NAME:
        name = name[: _MAX_NAME - 25] + "~" + sha256_json(case_id)[:24]
    return name


def decode_case_id(name: str) -> str | None:
    """Inverse of `encode_case_id`; None for hashed (over-long) names."""
    if "~" in name:
        return None
    raw = bytearray()
    i = 0
    while i < len(name):
        if name[i] == "%":
            raw.append(int(name[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(name[i]))
            i += 1
    return raw.decode("utf-8")


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{path} (new)")
            elif key not in new:
                out.append(f"{path} (missing)")
            else:
                out.extend(_diff_keys(old[key], new[key], path))
        return out
    return [] if old == new else [f"{prefix or '<root>'}: {old!r} -> {new!r}"]


def _normalize(obj: Any) -> Any:
    """Round-trip through JSON so tuples, Paths, numpy scalars and non-finite numbers (null) compare as stored."""
    return json.loads(json_text(obj))


class RunStore:
    """A run folder with atomic writes and resume without duplicates or losses."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.root = Path(run_dir)
        self.cases_dir = self.root / "cases"

    def __repr__(self) -> str:
        return f"RunStore({str(self.root)!r})"

    # --- write-once documents (config, prediction) --------------------------------------

    def _read_json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptFileError(
                f"{path} is not valid JSON ({exc}); it was damaged outside the workbench. "
                "Delete it to recompute that entry, or start a new run with a new --out"
            ) from exc

    def _write_fixed(self, name: str, obj: Any, what: str) -> str:
        path = self.root / name
        new = _normalize(obj)
        if path.exists():
            old = self._read_json(path)
            if old != new:
                diffs = _diff_keys(old, new)
                shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs) - 8} more)" if len(diffs) > 8 else "")
                raise WorkbenchError(
                    f"{self.root} already holds a run with a different {what} ({shown}). Resuming "
                    f"would mix two experiments: use a new --out folder, or rerun with the original {what}."
                )
        else:
            atomic_write_json(path, new)
        return sha256_json(new)

    def write_config(self, config: Mapping[str, Any]) -> str:
        """Record the run's config; on resume, refuse a config that differs. Returns its sha256."""
        return self._write_fixed("config.json", dict(config), "config")

    def read_config(self) -> dict[str, Any]:
        path = self.root / "config.json"
        if not path.exists():
            raise WorkbenchError(f"{self.root} has no config.json; is it a workbench run folder?")
        return self._read_json(path)

    def write_prediction(self, prediction: Any) -> str:
        """Record the prediction before any case runs; on resume it must be identical. Returns its sha256."""
        return self._write_fixed("prediction.json", prediction, "prediction")

    # --- cases ----------------------------------------------------------------------------

    def case_path(self, case_id: str) -> Path:
        if not isinstance(case_id, str) or not case_id:
            raise WorkbenchError(f"a case id must be a non-empty string, got {case_id!r}")
        return self.cases_dir / f"{encode_case_id(case_id)}.json"

    def has_case(self, case_id: str) -> bool:
        return self.case_path(case_id).is_file()

    def write_case(self, case_id: str, record: Any) -> Path:
        """Write (or replace) one case's record atomically."""
        path = self.case_path(case_id)
        return atomic_write_json(path, {"case_id": case_id, "written_at": time.time(), "record": record})

    def _case_files(self) -> list[Path]:
        if not self.cases_dir.is_dir():
            return []
        # Leading-dot names are temporaries of an interrupted atomic write: never a case.
        return sorted(p for p in self.cases_dir.iterdir() if p.suffix == ".json" and not p.name.startswith("."))

    def _load_case_file(self, path: Path) -> tuple[str, Any]:
        doc = self._read_json(path)
        if not isinstance(doc, dict) or "case_id" not in doc or "record" not in doc:
            raise CorruptFileError(f"{path} is not a case file (needs case_id and record); delete it to recompute that case")
        if self.case_path(doc["case_id"]) != path:
            raise CorruptFileError(f"{path} holds case {doc['case_id']!r}, which belongs in another file; delete it")
        return doc["case_id"], doc["record"]

    def case_ids(self) -> list[str]:
        """Ids of finished cases, sorted."""
        ids = []
        for path in self._case_files():
            decoded = decode_case_id(path.stem)
            ids.append(decoded if decoded is not None else self._load_case_file(path)[0])
        return sorted(ids)

    def load_case(self, case_id: str) -> Any:
        path = self.case_path(case_id)
        if not path.is_file():
            raise WorkbenchError(f"case {case_id!r} has not been run in {self.root}")
        return self._load_case_file(path)[1]

    def load_cases(self) -> dict[str, Any]:
        """Every finished case, sorted by id; a damaged file raises `CorruptFileError` naming it."""
        loaded = dict(self._load_case_file(p) for p in self._case_files())
        return {k: loaded[k] for k in sorted(loaded)}

    def pending(self, all_ids: Iterable[str]) -> list[str]:
        """The ids in `all_ids` (order kept) without a finished case."""
        ids = list(all_ids)
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
        if dupes:
            raise WorkbenchError(f"case ids must be unique; repeated: {dupes[:10]}")
        return [i for i in ids if not self.has_case(i)]

    def run_cases(
        self,
        ids: Iterable[str],
        fn: Callable[[str], Any],
        *,
        progress: bool = True,
        desc: str = "cases",
    ) -> dict[str, Any]:
        """Run `fn(case_id)` for each id without a finished case and store each result at once.

        A run killed midway keeps every case finished before the kill; calling again runs only
        the rest. Returns the records of all `ids` (loaded from disk), in the order given.
        """
        ids = list(ids)
        todo = self.pending(ids)
        with progress_bar(total=len(ids), initial=len(ids) - len(todo), desc=desc, enabled=progress) as bar:
            for case_id in todo:
                self.write_case(case_id, fn(case_id))
                bar.update(1)
        return {case_id: self.load_case(case_id) for case_id in ids}

    # --- artifacts and summary ------------------------------------------------------------

    def artifact_path(self, name: str) -> Path:
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
            raise WorkbenchError(f"artifact name {name!r} must be a relative path inside the run folder, without '..'")
        return self.root.joinpath(*parts)

    def write_artifact(self, name: str, data: bytes | str | Any) -> Path:
        """Atomically write bytes, text, or (anything else) JSON to `run_dir/name`."""
        path = self.artifact_path(name)
        if isinstance(data, (bytes, bytearray)):
            return atomic_write_bytes(path, bytes(data))
        if isinstance(data, str):
            return atomic_write_text(path, data)
        return atomic_write_json(path, data)

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        return atomic_write_json(self.root / "summary.json", dict(summary))

    def read_summary(self) -> dict[str, Any]:
        return self._read_json(self.root / "summary.json")
