"""Causal tracing (Meng et al. 2022, ROME): which hidden states carry a fact to the answer.

Three runs of the same prompt: clean; corrupted (seeded Gaussian noise added to the subject
tokens' embeddings, `noise` x the std of the token embedding matrix); and corrupted with one
clean state restored. How much of the answer's probability a restoration brings back is that
state's indirect effect; clean minus corrupted is the total effect. States are the residual
stream after a block (`hidden`), or the MLP / attention outputs (`mlp`, `attn`) restored over
a window of layers around the centre layer, clipped at the ends, as ROME's code does.

    trace = causal_trace(h, "The capital of {} is", "Vel Oran")
    trace.peak("mlp")            # TracePeak(kind='mlp', layer=2, token=3, ...)
    trace.plot("out/")           # out/trace_hidden.png, out/trace_mlp.png, out/trace_attn.png

Modules: `result` (CausalTrace, TracePeak, JSON), `engine` (the batched engine),
`average` (the average indirect effect over many facts), `plots` (matplotlib helpers).
"""

from __future__ import annotations

from workbench.tracing.average import BUCKETS, AverageIndirectEffect, average_indirect_effect
from workbench.tracing.engine import (
    KINDS,
    SITE_TEMPLATES,
    auto_batch_rows,
    causal_trace,
    embedding_std,
    restored_probability,
    window_layers,
)
from workbench.tracing.result import CausalTrace, TracePeak

__all__ = [
    "BUCKETS",
    "KINDS",
    "SITE_TEMPLATES",
    "AverageIndirectEffect",
    "CausalTrace",
    "TracePeak",
    "auto_batch_rows",
    "average_indirect_effect",
    "causal_trace",
    "embedding_std",
    "restored_probability",
    "window_layers",
]
