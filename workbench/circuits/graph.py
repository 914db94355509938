"""A circuit as data: which components of which model, scored by which method on which task.

Every component of the graph (nodes, or edges `SENDER->RECEIVER`) is listed with its score
and whether it is in the circuit, so the same file serves a ranking (faithfulness curves) and
a subnetwork (ablation, editing). The model's sha256 fingerprint is stored: a circuit found on
one model's weights is refused on any other, as a `WeightDelta` is. Saved as plain JSON,
written atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from workbench.errors import CorruptFileError, FingerprintMismatchError, WorkbenchError
from workbench.fingerprint import model_fingerprint
from workbench.handle import ModelHandle
from workbench.storage import atomic_write_json

FORMAT = "workbench-circuit"
VERSION = 1


@dataclass(frozen=True)
class Circuit:
    """Scored components of one model's graph and the subset kept as the circuit."""

    model: str  # the spec it was found on (zoo:factgpt, a folder)
    fingerprint: str  # sha256 over the model's parameters and buffers
    task: str
    method: str  # eap, eap-ig, acdc
    level: str  # node or edge
    components: tuple[str, ...]
    scores: tuple[float, ...]
    kept: tuple[bool, ...]
    ranking: str = "abs"  # how scores order components for curves: by |score| or by signed score
    results: dict[str, Any] = field(default_factory=dict)  # cpr, cmd, curves, seconds, settings

    def __post_init__(self) -> None:
        if not (len(self.components) == len(self.scores) == len(self.kept)):
            raise WorkbenchError(f"circuit has {len(self.components)} components, {len(self.scores)} scores and "
                                 f"{len(self.kept)} kept flags; give one of each per component")

    @property
    def nodes(self) -> list[str]:
        """The circuit's nodes: kept nodes, or the endpoints of kept edges (in graph order)."""
        if self.level == "node":
            return [c for c, k in zip(self.components, self.kept) if k]
        seen: dict[str, None] = {}
        for u, v in self.edges:
            seen.setdefault(u)
            seen.setdefault(v)
        return list(seen)

    @property
    def edges(self) -> list[tuple[str, str]]:
        """The circuit's kept edges as (sender, receiver); none at node level."""
        if self.level != "edge":
            return []
        return [tuple(c.split("->", 1)) for c, k in zip(self.components, self.kept) if k]  # type: ignore[misc]

    def top(self, n: int) -> list[tuple[str, float]]:
        """The `n` components with the largest |score|, with their scores."""
        pairs = sorted(zip(self.components, self.scores), key=lambda p: (-abs(p[1]), p[0]))
        return pairs[:n]

    # -- files -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model": self.model, "fingerprint": self.fingerprint,
                "task": self.task, "method": self.method, "level": self.level, "ranking": self.ranking,
                "components": list(self.components), "scores": [float(s) for s in self.scores],
                "kept": [bool(k) for k in self.kept], "results": self.results}

    @staticmethod
    def from_json(obj: Any, *, where: str = "circuit") -> Circuit:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise CorruptFileError(f"{where} is not a workbench circuit (no \"format\": \"{FORMAT}\"); "
                                   "give a circuit.json written by `workbench circuit`")
        if obj.get("version") != VERSION:
            raise CorruptFileError(f"{where} is circuit format version {obj.get('version')!r}; this workbench reads {VERSION}")
        try:
            return Circuit(
                model=str(obj["model"]), fingerprint=str(obj["fingerprint"]), task=str(obj["task"]),
                method=str(obj["method"]), level=str(obj["level"]), components=tuple(str(c) for c in obj["components"]),
                scores=tuple(float(s) for s in obj["scores"]), kept=tuple(bool(k) for k in obj["kept"]),
                ranking=str(obj.get("ranking", "abs")), results=dict(obj.get("results") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{where} is missing or mangles a field ({exc!r}); rewrite it with `workbench circuit`") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_json(path, self.to_json())

    @staticmethod
    def load(path: str | os.PathLike[str]) -> Circuit:
        file = Path(path)
        try:
            obj = json.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise WorkbenchError(f"cannot read circuit {file} ({exc.strerror or exc}); give a circuit.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptFileError(f"{file} is not valid JSON ({exc}); give a circuit.json written by `workbench circuit`") from None
        return Circuit.from_json(obj, where=str(file))

    def check_model(self, target: ModelHandle | nn.Module) -> None:
        """Refuse a model whose weights are not the ones this circuit was found on."""
        model = target.model if isinstance(target, ModelHandle) else target
        found = model_fingerprint(model)
        if found != self.fingerprint:
            raise FingerprintMismatchError(
                f"this circuit was found on {self.model} (fingerprint {self.fingerprint[:12]}); the given model's "
                f"fingerprint is {found[:12]}: find the circuit again on this model")
