"""Devices and threads: `--device cpu|cuda|auto` everywhere, nothing assumes the CPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


def check_model_device(have: torch.device, device: DeviceSpec | torch.device | None) -> torch.device:
    """The device a computation runs on: where the model is (`have`); refuses a request for another one."""
    if device is None:
        return have
    want = resolve_device(device)
    if want.type != have.type or (want.index is not None and have.index is not None and want.index != have.index):
        raise WorkbenchError(f"the model is on {have}, not {want}; load it with device={str(want)!r} "
                             "(the computation runs where the model is)")
    return have


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run torch's CPU ops on `n` threads inside the block (`None`: leave as is); restored on exit."""
    old = torch.get_num_threads()
    if n is not None and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)
