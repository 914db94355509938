"""Saving the same tensors twice gives the same bytes (fingerprints depend on it)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load

from workbench.storage import safetensors_bytes


def test_safetensors_bytes_are_canonical_and_loadable():
    tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(3, dtype=torch.int64), "c": torch.zeros(1, dtype=torch.float16)}
    meta = {f"key{i}": str(i) for i in range(12)}  # many keys: a hash-map order would vary
    blobs = {safetensors_bytes(tensors, meta) for _ in range(20)}
    assert len(blobs) == 1
    blob = blobs.pop()
    n = int.from_bytes(blob[:8], "little")
    assert n % 8 == 0
    header = json.loads(blob[8:8 + n])
    assert list(header) == sorted(header) and header["__metadata__"] == meta
    back = load(blob)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
