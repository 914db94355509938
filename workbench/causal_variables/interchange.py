"""Interchange interventions along a subspace: read a site, run the base with the source's coordinates.

With an orthonormal basis W (width x k) of a subspace, the intervened representation is

    h' = h + W W^T (s - h)

the base's h with its coordinates along W replaced by the source's s, and left as it is
everywhere else. Token models are intervened at one position per pair (the subject's last
token, or the last token). Conv maps are intervened *pooled*: every position is shifted by
W W^T (mean(s) - mean(h)), so the spatial mean of the map along W becomes the source's. The
worlds' image variables (the main object's shape and colour) belong to the whole picture,
base and source objects sit at different places, and ShapesNet's head reads only the spatial
mean of layer3; a per-position swap would paste the source's object at its own location into
the base's map instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from workbench.causal_variables.pairs import InterchangePairs
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.hooks import capture, patch
from workbench.sites import resolve_site

Target = ModelHandle | nn.Module
Transform = Callable[[torch.Tensor], torch.Tensor]


def _model(target: Target) -> nn.Module:
    return target.model if isinstance(target, ModelHandle) else target


def _device(target: Target) -> torch.device:
    for p in _model(target).parameters():
        return p.device
    return torch.device("cpu")


class InterchangeRunner:
    """Reads and intervenes on one site of one model for a set of pairs (tokens or input tensors).

    `read` gives the representation the intervention acts on: the vector at the pair's
    position (tokens), the vector itself (a flat site) or the spatial mean (a conv map).
    `logits` runs the base inputs with `h + W W^T (s - h)` at the site; gradients flow to W.
    """

    def __init__(self, target: Target, site: str, pairs: InterchangePairs, *, batch_size: int = 256) -> None:
        self.target = target
        self.site = resolve_site(target, site).name
        self.site_arg = site
        self.pairs = pairs
        self.batch_size = batch_size
        self.device = _device(target)
        self.width = int(self.read("base", torch.arange(min(2, len(pairs)))).shape[1])

    # -- inputs -----------------------------------------------------------------------------------------------
    def _inputs(self, which: str, rows: torch.Tensor) -> tuple[dict[str, Any] | torch.Tensor, torch.Tensor | None]:
        p = self.pairs
        data = p.base if which == "base" else p.source
        if p.kind == "tokens":
            from workbench.tokens import pad_batch, pad_id

            tok = self.target.tokenizer if isinstance(self.target, ModelHandle) else None
            seqs = [data[i] for i in rows.tolist()]
            ids, mask = pad_batch(seqs, pad_id(tok) if tok is not None else 0, self.device)
            pos = (p.base_positions if which == "base" else p.source_positions)[rows].to(self.device)
            return {"input_ids": ids, "attention_mask": mask, "_last": mask.sum(1) - 1}, pos
        return data[rows].to(self.device), None

    def _forward(self, inputs: dict[str, Any] | torch.Tensor) -> torch.Tensor:
        """Output logits: the last real token's for a language model, the classes' for a classifier."""
        if isinstance(inputs, dict):
            last = inputs["_last"]
            out = _model(self.target)(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            logits = out.logits if hasattr(out, "logits") else out
            return logits[torch.arange(len(last), device=last.device), last]
        if isinstance(self.target, ModelHandle) and self.target.kind == "image_classifier":
            from workbench.classifier import logits

            return logits(self.target, inputs)
        out = _model(self.target)(inputs)
        return out.logits if hasattr(out, "logits") else out

    @staticmethod
    def _vectors(act: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        if pos is not None:
            if act.ndim != 3:
                raise WorkbenchError(f"a token site carries (batch, tokens, width); this one has shape {tuple(act.shape)}")
            return act[torch.arange(act.shape[0], device=act.device), pos]
        if act.ndim == 4:
            return act.mean(dim=(2, 3))
        if act.ndim == 2:
            return act
        raise WorkbenchError(f"site activations of shape {tuple(act.shape)}: expected (batch, width) or a conv map "
                             "(batch, channels, height, width) for input tensors")

    # -- reading ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def read(self, which: str, rows: torch.Tensor | None = None, *, transform: Transform | None = None) -> torch.Tensor:
        """(n, width) float32 representations of the base or source inputs at the site, on the CPU.

        `transform` maps the raw site activation first (e.g. an SAE's `encode_site`), so what is
        read is the transformed vector at the position, or its spatial mean.
        """
        rows = torch.arange(len(self.pairs)) if rows is None else rows
        out = []
        model = _model(self.target)
        was = model.training
        model.eval()
        try:
            for i in range(0, len(rows), self.batch_size):
                inputs, pos = self._inputs(which, rows[i:i + self.batch_size])
                with capture(self.target, [self.site_arg], stop=True) as acts:
                    self._forward(inputs)  # cut short once the site is recorded
                act = acts[self.site_arg]
                if transform is not None:
                    act = transform(act)
                out.append(self._vectors(act, pos).float().cpu())
        finally:
            model.train(was)
        return torch.cat(out)

    # -- intervening --------------------------------------------------------------------------------------------
    def logits(self, rows: torch.Tensor, basis: torch.Tensor | None, source: torch.Tensor | None) -> torch.Tensor:
        """Output logits of the base inputs at `rows` with their coordinates along `basis` (width x k,
        orthonormal columns) set to `source`'s ((n, width) vectors from `read("source")`); no
        intervention when `basis` is None. Differentiable in `basis`."""
        inputs, pos = self._inputs("base", rows)
        if basis is None:
            return self._forward(inputs)
        src = source.to(self.device)
        w = basis.to(self.device)

        def swap(act: torch.Tensor) -> torch.Tensor:
            h = self._vectors(act, pos)
            delta = ((src.to(act.dtype) - h) @ w.to(act.dtype)) @ w.to(act.dtype).T
            if pos is not None:
                shift = torch.zeros_like(act).index_put((torch.arange(act.shape[0], device=act.device), pos), delta)
                return act + shift
            if act.ndim == 4:
                return act + delta[:, :, None, None]
            return act + delta

        with patch(self.target, {self.site_arg: swap}):
            return self._forward(inputs)

    @torch.no_grad()
    def predictions(self, rows: torch.Tensor, basis: torch.Tensor | None, source: torch.Tensor | None) -> torch.Tensor:
        """Argmax outputs of the intervened base inputs, batched, on the CPU."""
        model = _model(self.target)
        was = model.training
        model.eval()
        out = []
        try:
            for i in range(0, len(rows), self.batch_size):
                r = rows[i:i + self.batch_size]
                out.append(self.logits(r, basis, None if source is None else source[i:i + self.batch_size])
                           .argmax(-1).cpu())
        finally:
            model.train(was)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def interchange_hits(runner: InterchangeRunner, rows: torch.Tensor, basis: torch.Tensor | None,
                     source: torch.Tensor) -> torch.Tensor:
    """Per pair at `rows`: whether the intervened model outputs the counterfactual label (bool)."""
    pred = runner.predictions(rows, basis, source)
    return pred == runner.pairs.counterfactual_labels[rows]


__all__ = ["InterchangeRunner", "interchange_hits"]
