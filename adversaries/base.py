"""What every adversary generator returns: `AdversarialExamples`.

One container for perturbation attacks (PGD), patch attacks (copy/paste, trained patches),
scene-level adversaries (feature-level, natural) and text triggers, so the CLI, the
trojan-rediscovery scorer and the case studies read results the same way whatever made them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.storage import atomic_write_json, save_safetensors


@dataclass
class AdversarialExamples:
    """Originals, their adversarial versions and how they were made.

    `inputs` / `adversarial`: image tensors `(N, C, H, W)` in the model's declared input
    range, or, for text adversaries, lists of strings. `perturbation` is
    `adversarial - inputs` for additive attacks; `patch` the pasted or trained patch
    `(C, h, w)` (or the trigger text). `loss_trace` is the optimization loss per step
    (empty for search-only methods). `success` is one bool per item under the method's own
    criterion (targeted: predicted class == target; untargeted: prediction changed).
    `extra` holds method-specific evidence (placements, scene parameters, probabilities),
    JSON-serializable.
    """

    method: str
    inputs: Any
    adversarial: Any
    success: torch.Tensor
    target: int | str | None = None
    perturbation: torch.Tensor | None = None
    patch: Any = None
    loss_trace: list[float] = field(default_factory=list)
    original_pred: torch.Tensor | None = None
    adversarial_pred: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.success = torch.as_tensor(self.success, dtype=torch.bool).flatten().cpu()
        n = len(self.inputs)
        if len(self.adversarial) != n or self.success.numel() != n:
            raise ValueError(
                f"{self.method}: {n} inputs, {len(self.adversarial)} adversarial inputs and "
                f"{self.success.numel()} success flags; all three must have one entry per item")

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean()) if len(self) else float("nan")

    def summary(self) -> dict[str, Any]:
        """JSON-ready headline numbers (no tensors)."""
        out: dict[str, Any] = {
            "method": self.method,
            "n": len(self),
            "target": self.target,
            "success_rate": self.success_rate,
            "n_success": int(self.success.sum()),
            "final_loss": self.loss_trace[-1] if self.loss_trace else None,
            "steps": len(self.loss_trace),
        }
        if isinstance(self.perturbation, torch.Tensor) and self.perturbation.numel():
            flat = self.perturbation.flatten(1)
            out["linf"] = float(flat.abs().max())
            out["l2_mean"] = float(flat.norm(dim=1).mean())
        out.update({k: v for k, v in self.extra.items() if _is_jsonable(v)})
        return out

    def save(self, out_dir: str | Path) -> Path:
        """Write `examples.safetensors` (image tensors) and `examples.json` (everything else)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {"success": self.success.to(torch.uint8)}
        for name in ("inputs", "adversarial", "perturbation", "patch", "original_pred", "adversarial_pred"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().contiguous()
        save_safetensors(out / "examples.safetensors", tensors, {"method": self.method})
        record = self.summary()
        record["loss_trace"] = list(self.loss_trace)
        if not isinstance(self.inputs, torch.Tensor):
            record["inputs"] = list(self.inputs)
            record["adversarial"] = list(self.adversarial)
        if isinstance(self.patch, str):
            record["patch"] = self.patch
        atomic_write_json(out / "examples.json", record)
        return out


def _is_jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
