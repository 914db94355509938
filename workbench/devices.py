"""Device resolution: `--device cpu|cuda|auto` everywhere, nothing assumes the CPU."""

from __future__ import annotations

from typing import Literal

import torch

from workbench.errors import WorkbenchError

DeviceSpec = Literal["cpu", "cuda", "auto"] | str


def resolve_device(spec: DeviceSpec | torch.device | None = "auto") -> torch.device:
    """Turn a user's device choice into a `torch.device`; `auto` picks CUDA when present."""
    if isinstance(spec, torch.device):
        return spec
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise WorkbenchError(f"device {spec!r} requested but CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(spec)
    except RuntimeError as exc:
        raise WorkbenchError(f"unknown device {spec!r}; expected cpu, cuda, cuda:N or auto") from exc
