"""sha256 fingerprints of model parameters.

A fingerprint identifies exact weights: deltas record the fingerprint of the model they
were fitted on (and refuse other models), statistics caches are keyed by it, and revert
is checked bit-exact by comparing fingerprints of the touched parameters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 over dtype, shape and the raw bytes of a tensor (device-independent)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = hashlib.sha256()
    h.update(str(t.dtype).encode())
    h.update(str(tuple(t.shape)).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # reshape: 0-dim buffers (BN counters)
    return h.hexdigest()


def parameter_fingerprint(model: nn.Module, names: Iterable[str] | None = None) -> str:
    """sha256 over the named parameters (all parameters and buffers when `names` is None)."""
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    selected = sorted(state) if names is None else sorted(names)
    h = hashlib.sha256()
    for name in selected:
        if name not in state:
            raise KeyError(f"model has no parameter {name!r}")
        h.update(name.encode())
        h.update(tensor_digest(state[name]).encode())
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of a whole model: every parameter and buffer."""
    return parameter_fingerprint(model)
