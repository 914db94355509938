"""sha256 fingerprints of model parameters.

A fingerprint identifies exact weights: deltas record the fingerprint of the model they
were fitted on (and refuse other models), statistics caches are keyed by it, and revert
is checked bit-exact by comparing fingerprints of the touched parameters.

Cost is one pass of sha256 over the model's bytes (about 1-2 GB/s per core with SHA
extensions; hashlib releases the GIL, so large models are hashed on several threads).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

PARALLEL_BYTES = 64 * 2**20
"""Models at least this large are hashed tensor-by-tensor on a thread pool."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 over dtype, shape and the raw bytes of a tensor (device-independent)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = hashlib.sha256()
    h.update(str(t.dtype).encode())
    h.update(str(tuple(t.shape)).encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # reshape: 0-dim buffers (BN counters); no byte copy
    return h.hexdigest()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    return state


def tensor_digests(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, str]:
    """Name -> `tensor_digest` for the named tensors (every parameter and buffer when None)."""
    state = _state(model)
    selected = sorted(state) if names is None else sorted(names)
    for name in selected:
        if name not in state:
            raise KeyError(f"model has no parameter {name!r}")
    tensors = [state[n] for n in selected]
    total = sum(t.numel() * t.element_size() for t in tensors)
    workers = min(len(tensors), os.cpu_count() or 1, 8)
    if total < PARALLEL_BYTES or workers < 2:
        return {n: tensor_digest(t) for n, t in zip(selected, tensors)}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(selected, pool.map(tensor_digest, tensors)))


def combine_digests(digests: Mapping[str, str], names: Iterable[str] | None = None) -> str:
    """The fingerprint of `names` (all of `digests` when None) from per-tensor digests."""
    selected = sorted(digests) if names is None else sorted(names)
    h = hashlib.sha256()
    for name in selected:
        if name not in digests:
            raise KeyError(f"model has no parameter {name!r}")
        h.update(name.encode())
        h.update(digests[name].encode())
    return h.hexdigest()


def parameter_fingerprint(model: nn.Module, names: Iterable[str] | None = None) -> str:
    """sha256 over the named parameters (all parameters and buffers when `names` is None)."""
    names = None if names is None else list(names)
    return combine_digests(tensor_digests(model, names), names)


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of a whole model: every parameter and buffer."""
    return parameter_fingerprint(model)
