"""Text features: top-activating contexts for a unit or direction, and gradient-guided token search.

`top_contexts` runs texts through any Hugging Face model the workbench loads (FactGPT,
MiniLM, a user's GPT-2 or Llama), reads one site (canonical `blocks.{L}.mlp.hook_post`
or any module name) and returns the token positions where a unit, or the projection on a
direction, is highest, each with its left context, plus the tokens that excite it most on
average: the text analogue of dataset exemplars.

`token_search` finds inputs that maximize an objective by discrete search, as in HotFlip
and GCG: the trigger tokens are one-hot vectors times the embedding matrix, so the
gradient of the objective with respect to each one-hot row ranks every vocabulary token
by its first-order gain at that slot; the search keeps the `top_k` candidates per slot,
samples `batch` single-token swaps, evaluates them all exactly in batched forward passes
and keeps the best (with `top_k=1`, `batch=n_tokens` this is HotFlip). The trigger is
placed between a prefix and a suffix; several (prefix, suffix) contexts make the search
universal (the score is their mean).

    res = token_search(h, LogitObjective(target_ids=(tid,)), n_tokens=3, steps=40, seed=0,
                       contexts=[("", " The capital of Vel Oran is")])
    res.text, res.score, res.trace

`transformers` is never imported here (handles carry their own tokenizer and model).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Union

import torch

from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.hooks import capture
from workbench.progress import progress_bar
from workbench.sites import resolve_site
from workbench.tokens import pad_batch, pad_id

log = logging.getLogger(__name__)

Position = Union[Literal["last", "mean", "trigger"], int]


# --------------------------------------------------------------------------------------
# Tokens in, activations out
# --------------------------------------------------------------------------------------


def _require_text(handle: ModelHandle) -> Any:
    if handle.tokenizer is None or handle.kind == "image_classifier":
        raise WorkbenchError(f"{handle.spec} is not a text model with a tokenizer; text features need one "
                             "(zoo:factgpt, minilm, a Hugging Face folder)")
    return handle.tokenizer


def _unit_or_direction(act: torch.Tensor, unit_or_direction: int | torch.Tensor, site: str) -> torch.Tensor:
    """Scores `(B, T)` from activations `(B, T, D)`: one unit, or the projection on a direction."""
    if act.ndim != 3:
        raise WorkbenchError(f"site {site!r} gives activations of shape {tuple(act.shape)}; text features need "
                             "(batch, tokens, features): choose a residual, MLP or attention site")
    d = act.shape[-1]
    if isinstance(unit_or_direction, torch.Tensor):
        vec = unit_or_direction.to(act.device, act.dtype).flatten()
        if vec.numel() != d:
            raise WorkbenchError(f"direction has {vec.numel()} entries; site {site!r} has {d} features")
        return act @ vec
    unit = int(unit_or_direction)
    if not 0 <= unit < d:
        raise WorkbenchError(f"unit {unit} is out of range: site {site!r} has {d} units (0..{d - 1})")
    return act[..., unit]


@dataclass
class TopContexts:
    """The highest-scoring token positions for one unit or direction, and the best tokens on average."""

    site: str
    unit: int | None
    rows: list[dict[str, Any]]
    top_tokens: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "unit": self.unit, "rows": self.rows, "top_tokens": self.top_tokens}


@torch.no_grad()
def top_contexts(handle: ModelHandle, site: str, unit_or_direction: int | torch.Tensor, texts: Sequence[str], *,
                 k: int = 10, window: int = 6, batch_size: int = 32, min_count: int = 2) -> TopContexts:
    """Top-`k` (text, token) positions by activation at `site`, with `window` tokens of left context.

    `top_tokens`: tokens ranked by their mean score over every occurrence (at least
    `min_count` occurrences), the "which words does this neuron like" view.
    """
    tok = _require_text(handle)
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise WorkbenchError("no texts given; top_contexts needs a corpus to rank positions in")
    if k < 1:
        raise WorkbenchError(f"k={k}: expected >= 1")
    resolve_site(handle, site)
    seqs = [tok(t)["input_ids"] for t in texts]
    pad = pad_id(tok)
    scores: list[tuple[float, int, int]] = []
    by_token: dict[int, list[float]] = {}
    was = handle.model.training
    handle.model.eval()
    try:
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            ids, mask = pad_batch(chunk, pad, handle.device)
            with capture(handle, [site]) as acts:
                handle.model(input_ids=ids, attention_mask=mask)
            s = _unit_or_direction(acts[site], unit_or_direction, site).float().cpu()
            for i, seq in enumerate(chunk):
                for p, t in enumerate(seq):
                    v = float(s[i, p])
                    scores.append((v, start + i, p))
                    by_token.setdefault(int(t), []).append(v)
    finally:
        handle.model.train(was)
    scores.sort(key=lambda r: -r[0])
    rows = []
    for v, ti, p in scores[:k]:
        seq = seqs[ti]
        left = tok.decode(seq[max(0, p - window):p])
        rows.append({"text_index": ti, "position": p, "token": tok.decode([seq[p]]), "context": f"{left}[[{tok.decode([seq[p]])}]]",
                     "activation": round(v, 5)})
    token_rows = [{"token": tok.decode([t]), "token_id": t, "mean": round(sum(v) / len(v), 5), "max": round(max(v), 5),
                   "count": len(v)} for t, v in by_token.items() if len(v) >= min_count]
    token_rows.sort(key=lambda r: -r["mean"])
    unit = None if isinstance(unit_or_direction, torch.Tensor) else int(unit_or_direction)
    return TopContexts(site=site, unit=unit, rows=rows, top_tokens=token_rows[:k])


# --------------------------------------------------------------------------------------
# Objectives for token search
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where things are in a batch of sequences: last real token and the trigger slice, per row."""

    last: torch.Tensor  # (B,)
    trigger_start: torch.Tensor  # (B,)
    n_trigger: int
    mask: torch.Tensor  # (B, T) attention mask


class TextObjective(Protocol):
    """Maps model outputs (and captured site activations) to one score per sequence, to maximize."""

    sites: tuple[str, ...]

    def __call__(self, outputs: Any, acts: dict[str, torch.Tensor], layout: Layout) -> torch.Tensor: ...


def _at(values: torch.Tensor, position: Position, layout: Layout) -> torch.Tensor:
    """Pick `(B,)` from `(B, T)` scores at a position: last token, mean over real tokens, mean over the trigger, or an index."""
    b = values.shape[0]
    rows = torch.arange(b, device=values.device)
    if position == "last":
        return values[rows, layout.last.to(values.device)]
    if position == "mean":
        m = layout.mask.to(values.dtype)
        return (values * m).sum(1) / m.sum(1).clamp_min(1)
    if position == "trigger":
        t = torch.arange(values.shape[1], device=values.device)[None]
        st = layout.trigger_start.to(values.device)[:, None]
        sel = ((t >= st) & (t < st + layout.n_trigger)).to(values.dtype)
        return (values * sel).sum(1) / sel.sum(1).clamp_min(1)
    if isinstance(position, int):
        return values[:, position]
    raise WorkbenchError(f"position {position!r}: expected 'last', 'mean', 'trigger' or a token index")


@dataclass(frozen=True)
class NeuronObjective:
    """Activation of one unit at `site`, read at `position`."""

    site: str
    unit: int
    position: Position = "last"

    @property
    def sites(self) -> tuple[str, ...]:
        return (self.site,)

    def __call__(self, outputs: Any, acts: dict[str, torch.Tensor], layout: Layout) -> torch.Tensor:
        return _at(_unit_or_direction(acts[self.site], self.unit, self.site), self.position, layout)


@dataclass(frozen=True)
class DirectionObjective:
    """Projection of the activation at `site` on `direction`, read at `position`."""

    site: str
    direction: torch.Tensor
    position: Position = "last"

    @property
    def sites(self) -> tuple[str, ...]:
        return (self.site,)

    def __call__(self, outputs: Any, acts: dict[str, torch.Tensor], layout: Layout) -> torch.Tensor:
        return _at(_unit_or_direction(acts[self.site], self.direction, self.site), self.position, layout)


@dataclass(frozen=True)
class LogitObjective:
    """Next-token log-probability of `target_ids` (log-sum-exp over them) at the last token,
    minus that of `baseline_ids` when given (a margin: make the new answer beat the old)."""

    target_ids: tuple[int, ...]
    baseline_ids: tuple[int, ...] = ()
    sites: tuple[str, ...] = ()

    def __call__(self, outputs: Any, acts: dict[str, torch.Tensor], layout: Layout) -> torch.Tensor:
        logits = getattr(outputs, "logits", None)
        if logits is None:
            raise WorkbenchError("LogitObjective needs a language-model head (outputs.logits); this model has none")
        rows = torch.arange(logits.shape[0], device=logits.device)
        lp = logits[rows, layout.last.to(logits.device)].float().log_softmax(-1)
        score = lp[:, list(self.target_ids)].logsumexp(-1)
        if self.baseline_ids:
            score = score - lp[:, list(self.baseline_ids)].logsumexp(-1)
        return score


# --------------------------------------------------------------------------------------
# Token search
# --------------------------------------------------------------------------------------


@dataclass
class TokenSearchResult:
    """The best trigger found: token ids, their text, score, and the search trace."""

    tokens: list[int]
    text: str
    score: float
    trace: list[float] = field(default_factory=list)
    per_context: list[float] = field(default_factory=list)
    n_evaluations: int = 0
    diverged: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "text": self.text, "score": self.score, "trace": self.trace,
                "per_context": self.per_context, "n_evaluations": self.n_evaluations, "diverged": self.diverged}


def allowed_tokens(handle: ModelHandle, *, exclude: Sequence[int] = (), ascii_only: bool = True) -> torch.Tensor:
    """Vocabulary ids a trigger may use: not special, decodes to non-empty printable text, not excluded."""
    tok = _require_text(handle)
    emb = _embedding(handle)
    vocab = emb.weight.shape[0]
    special = set(int(i) for i in (getattr(tok, "all_special_ids", None) or []))
    bad = special | {int(i) for i in exclude}
    keep = []
    for i in range(min(vocab, len(tok))):
        if i in bad:
            continue
        s = tok.decode([i])
        if not s.strip():
            continue
        if ascii_only and not (s.isascii() and s.isprintable()):
            continue
        if s.strip().startswith("[") and s.strip().endswith("]"):  # [unused12], [PAD]-style pieces
            continue
        keep.append(i)
    if not keep:
        raise WorkbenchError("no vocabulary token is allowed in a trigger; loosen `exclude` / ascii_only")
    return torch.tensor(keep, dtype=torch.long)


def _embedding(handle: ModelHandle) -> torch.nn.Embedding:
    get = getattr(handle.model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, torch.nn.Embedding):
        raise WorkbenchError(f"{handle.spec}: cannot find the input embedding (get_input_embeddings); token search needs it")
    return emb


def _context_ids(handle: ModelHandle, contexts: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of each (prefix, suffix); encoder models (with a CLS token) get CLS ... SEP around them."""
    tok = _require_text(handle)
    cls_id = getattr(tok, "cls_token_id", None)
    sep_id = getattr(tok, "sep_token_id", None)
    encoder = handle.kind in ("encoder", "masked_lm") and cls_id is not None and sep_id is not None
    out = []
    for pre, suf in contexts:
        p = tok(pre, add_special_tokens=False)["input_ids"] if pre else []
        s = tok(suf, add_special_tokens=False)["input_ids"] if suf else []
        if encoder:
            p, s = [int(cls_id)] + list(p), list(s) + [int(sep_id)]
        out.append((list(p), list(s)))
    return out


def _evaluate(handle: ModelHandle, objective: TextObjective, ctx: list[tuple[list[int], list[int]]],
              triggers: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Exact scores `(n_candidates, n_contexts)` of discrete triggers `(n_candidates, n_tokens)`."""
    n_cand, n_tok = triggers.shape
    seqs, starts = [], []
    for trig in triggers.tolist():
        for pre, suf in ctx:
            seqs.append(pre + trig + suf)
            starts.append(len(pre))
    pad = pad_id(handle.tokenizer)
    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            ids, mask = pad_batch(chunk, pad, handle.device)
            layout = Layout(last=mask.sum(1) - 1, trigger_start=torch.tensor(starts[i:i + batch_size]), n_trigger=n_tok, mask=mask)
            with capture(handle, list(objective.sites)) as acts:
                outputs = handle.model(input_ids=ids, attention_mask=mask)
            out.append(objective(outputs, acts, layout).float().cpu())
    return torch.cat(out).view(n_cand, len(ctx))


def _gradients(handle: ModelHandle, objective: TextObjective, ctx: list[tuple[list[int], list[int]]],
               trigger: torch.Tensor, emb: torch.nn.Embedding) -> torch.Tensor:
    """d(mean score)/d(one-hot) for the current trigger: `(n_tokens, vocab)`."""
    w = emb.weight
    one_hot = torch.zeros(len(trigger), w.shape[0], device=w.device, dtype=w.dtype)
    one_hot[torch.arange(len(trigger)), trigger.to(w.device)] = 1.0
    one_hot.requires_grad_(True)
    trig_emb = one_hot @ w
    pad = pad_id(handle.tokenizer)
    seqs = [pre + trigger.tolist() + suf for pre, suf in ctx]
    ids, mask = pad_batch(seqs, pad, handle.device)
    embeds = emb(ids).detach()
    rows = []
    for b, (pre, _) in enumerate(ctx):
        e = embeds[b]
        rows.append(torch.cat([e[: len(pre)], trig_emb, e[len(pre) + len(trigger):]]))
    inputs = torch.stack(rows)
    layout = Layout(last=mask.sum(1) - 1, trigger_start=torch.tensor([len(p) for p, _ in ctx]), n_trigger=len(trigger), mask=mask)
    with capture(handle, list(objective.sites), detach=False) as acts:
        outputs = handle.model(inputs_embeds=inputs, attention_mask=mask)
    score = objective(outputs, acts, layout).mean()
    (grad,) = torch.autograd.grad(score, one_hot)
    return grad


def token_search(handle: ModelHandle, objective: TextObjective, *, n_tokens: int = 5, steps: int = 50, seed: int = 0,
                 contexts: Sequence[tuple[str, str]] = (("", ""),), top_k: int = 64, batch: int = 128,
                 allowed: torch.Tensor | None = None, init: Sequence[int] | None = None,
                 patience: int | None = None, progress: bool = False) -> TokenSearchResult:
    """Maximize `objective` over `n_tokens` trigger tokens placed between each (prefix, suffix).

    Each step: one backward pass for the one-hot gradients, then `batch` single-token
    swaps drawn from the `top_k` best-ranked tokens per slot, scored exactly and batched;
    the best candidate becomes the current trigger, and the best trigger ever seen is
    returned. `allowed` restricts the vocabulary (default `allowed_tokens(handle)`);
    `patience` stops after that many steps without improvement. Deterministic given `seed`.
    """
    _require_text(handle)
    if n_tokens < 1 or steps < 0 or top_k < 1 or batch < 1:
        raise WorkbenchError(f"n_tokens={n_tokens}, steps={steps}, top_k={top_k}, batch={batch}: need n_tokens, top_k, batch >= 1 and steps >= 0")
    if not contexts:
        raise WorkbenchError("contexts is empty; give at least one (prefix, suffix) pair (('', '') for a bare trigger)")
    emb = _embedding(handle)
    allow = allowed_tokens(handle) if allowed is None else torch.as_tensor(allowed, dtype=torch.long).flatten()
    vocab = emb.weight.shape[0]
    if allow.numel() == 0 or int(allow.max()) >= vocab or int(allow.min()) < 0:
        raise WorkbenchError(f"allowed token ids must lie in 0..{vocab - 1} and not be empty")
    ctx = _context_ids(handle, contexts)
    g = torch.Generator().manual_seed(seed)
    if init is None:
        current = allow[torch.randint(len(allow), (n_tokens,), generator=g)]
    else:
        current = torch.tensor(list(init), dtype=torch.long)
        if current.numel() != n_tokens:
            raise WorkbenchError(f"init has {current.numel()} tokens; n_tokens is {n_tokens}")
    model = handle.model
    was = model.training
    model.eval()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    mask_vocab = torch.full((vocab,), float("-inf"))
    mask_vocab[allow] = 0.0
    diverged = None
    try:
        per = _evaluate(handle, objective, ctx, current[None])[0]
        cur_score = float(per.mean())
        best = (cur_score, current.clone(), per)
        trace = [cur_score]
        n_eval = 1
        stale = 0
        for step in progress_bar(range(steps), desc="token search", enabled=progress, leave=False):
            grad = _gradients(handle, objective, ctx, current, emb).float().cpu()
            if not bool(torch.isfinite(grad).all()):
                diverged = {"step": step, "what": "non-finite one-hot gradient", "action": "stopped; kept the best trigger"}
                log.warning("token search: non-finite gradient at step %d; stopping", step)
                break
            ranked = (grad + mask_vocab).topk(min(top_k, len(allow)), dim=1).indices  # (n_tokens, k)
            slots = torch.randint(n_tokens, (batch,), generator=g)
            picks = ranked[slots, torch.randint(ranked.shape[1], (batch,), generator=g)]
            cands = current[None].repeat(batch, 1)
            cands[torch.arange(batch), slots] = picks
            cands = torch.unique(cands, dim=0)
            scores = _evaluate(handle, objective, ctx, cands)
            n_eval += len(cands)
            mean = scores.mean(1)
            mean = torch.where(torch.isfinite(mean), mean, torch.full_like(mean, -math.inf))
            i = int(mean.argmax())
            current, cur_score = cands[i].clone(), float(mean[i])
            if cur_score > best[0]:
                best = (cur_score, current.clone(), scores[i])
                stale = 0
            else:
                stale += 1
            trace.append(best[0])
            if patience is not None and stale >= patience:
                break
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was)
    tokens = [int(t) for t in best[1]]
    return TokenSearchResult(tokens=tokens, text=handle.tokenizer.decode(tokens), score=best[0], trace=trace,
                             per_context=[float(v) for v in best[2]], n_evaluations=n_eval, diverged=diverged)
