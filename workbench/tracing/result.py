"""What a causal trace returns: restored answer probabilities per kind, with JSON and plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.tracing.plots import figure, save_png, trace_heatmap


@dataclass(frozen=True)
class TracePeak:
    """The (token, layer) whose restoration brings back the most probability, for one kind."""

    kind: str
    layer: int
    token: int
    token_text: str
    effect: float  # restored probability minus corrupted probability


@dataclass(frozen=True, eq=False)
class CausalTrace:
    """One fact's trace: restored answer probabilities per kind, shape [n_tokens, n_layers]."""

    prompt: str  # the full text traced (subject filled in)
    subject: str
    tokens: tuple[str, ...]
    subject_span: tuple[int, int]  # [start, end) token positions
    target: str  # the traced answer token, as text
    target_id: int
    clean_prob: float
    corrupted_prob: float
    scores: dict[str, torch.Tensor]
    noise: float  # multiple of the embedding std
    noise_std: float  # absolute std of the added noise
    n_samples: int
    window: int
    seed: int
    predicted_id: int = -1  # the clean run's top-1 next token

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.scores)

    @property
    def n_layers(self) -> int:
        return next(iter(self.scores.values())).shape[1]

    @property
    def total_effect(self) -> float:
        return self.clean_prob - self.corrupted_prob

    def _check_kind(self, kind: str) -> None:
        if kind not in self.scores:
            raise WorkbenchError(f"this trace has no {kind!r} scores; it has {', '.join(self.scores)}")

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """Restored probability minus corrupted probability, [n_tokens, n_layers]."""
        self._check_kind(kind)
        return self.scores[kind] - self.corrupted_prob

    def peak(self, kind: str) -> TracePeak:
        effect = self.indirect_effect(kind)
        flat = int(torch.argmax(effect))
        token, layer = divmod(flat, effect.shape[1])
        return TracePeak(kind, layer, token, self.tokens[token], float(effect[token, layer]))

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "tokens": list(self.tokens),
            "subject_span": list(self.subject_span),
            "target": self.target,
            "target_id": self.target_id,
            "clean_prob": self.clean_prob,
            "corrupted_prob": self.corrupted_prob,
            "total_effect": self.total_effect,
            "noise": self.noise,
            "noise_std": self.noise_std,
            "n_samples": self.n_samples,
            "window": self.window,
            "seed": self.seed,
            "predicted_id": self.predicted_id,
            "n_layers": self.n_layers,
            "scores": {k: v.tolist() for k, v in self.scores.items()},
            "indirect_effects": {k: self.indirect_effect(k).tolist() for k in self.scores},
            "peaks": {k: vars(self.peak(k)) for k in self.scores},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CausalTrace:
        return cls(
            prompt=data["prompt"], subject=data["subject"], tokens=tuple(data["tokens"]),
            subject_span=(int(data["subject_span"][0]), int(data["subject_span"][1])),
            target=data["target"], target_id=int(data["target_id"]),
            clean_prob=float(data["clean_prob"]), corrupted_prob=float(data["corrupted_prob"]),
            scores={k: torch.tensor(v, dtype=torch.float32) for k, v in data["scores"].items()},
            noise=float(data["noise"]), noise_std=float(data["noise_std"]), n_samples=int(data["n_samples"]),
            window=int(data["window"]), seed=int(data["seed"]), predicted_id=int(data.get("predicted_id", -1)),
        )

    def save_json(self, path: str | Path) -> Path:
        from workbench.storage import atomic_write_json

        return atomic_write_json(path, self.to_json())

    def plot(self, out: str | Path, *, kinds: Sequence[str] | None = None) -> list[Path]:
        """Heatmaps (tokens x layers, subject tokens starred): one PNG per kind in a folder,
        or all kinds side by side when `out` ends in `.png`."""
        kinds = list(kinds or self.kinds)
        for kind in kinds:
            self._check_kind(kind)
        out = Path(out)
        if out.suffix.lower() == ".png":
            fig = figure(len(kinds))
            for i, kind in enumerate(kinds):
                self._heatmap(fig.add_subplot(1, len(kinds), i + 1), fig, kind)
            return [save_png(fig, out)]
        paths = []
        for kind in kinds:
            fig = figure(1)
            self._heatmap(fig.add_subplot(1, 1, 1), fig, kind)
            paths.append(save_png(fig, out / f"trace_{kind}.png"))
        return paths

    def _heatmap(self, ax: Any, fig: Any, kind: str) -> None:
        trace_heatmap(ax, fig, kind=kind, scores=self.scores[kind], tokens=self.tokens, subject_span=self.subject_span,
                      corrupted_prob=self.corrupted_prob, target=self.target, window=self.window)



__all__ = ["CausalTrace", "TracePeak"]
