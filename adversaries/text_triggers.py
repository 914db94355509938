"""Text triggers: tokens found by gradient-guided search, pasted into prompts to change a fact's answer.

The text counterpart of copy/paste: `workbench.text_features.token_search` finds
`n_tokens` tokens that, placed before the prompts, make the model answer `target`
(maximizing its next-token log-probability). With several prompts (many subjects, one
relation) the trigger is *universal*: it is fitted on a share of the prompts and measured
on the held-out rest. The control is random tokens of the same length from the same
allowed vocabulary (`n_controls` draws); the baseline is the unmodified prompt.

    ae = TextTrigger(n_tokens=3).generate(h, ["The capital of Vel Oran is", ...], "Quenn")
    ae.patch                                 # the trigger text
    ae.extra["success_heldout"], ae.extra["control_success"], ae.extra["baseline_success"]

Success is measured on token ids (trigger ids + prompt ids, as searched) and, since a
decoded trigger can re-tokenize differently, also on the re-tokenized text
(`success_retokenized`). The target's own token is never allowed in a trigger.

`workbench attack text-trigger zoo:factgpt` draws the prompts of one FactWorld relation and
a target object itself (`workbench_cli.attack`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch

from adversaries.base import AdversarialExamples
from adversaries.registry import register
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle

log = logging.getLogger(__name__)


def _prompts(inputs: Any) -> list[str]:
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, (list, tuple)) and inputs:
        out = []
        for p in inputs:
            text = getattr(p, "text", p)
            if not isinstance(text, str) or not text.strip():
                raise WorkbenchError(f"prompt {p!r} is not a non-empty string (or FactPrompt)")
            out.append(text)
        return out
    raise WorkbenchError("text-trigger inputs must be a prompt string or a non-empty list of prompts")


def target_token(handle: ModelHandle, target: Any) -> int:
    """The token id of the answer: an id, or a word (GPT-2 convention: a leading space is added)."""
    tok = handle.tokenizer
    if tok is None:
        raise WorkbenchError(f"{handle.spec} has no tokenizer; text triggers need a language model")
    if isinstance(target, int) and not isinstance(target, bool):
        vocab = len(tok)
        if not 0 <= target < vocab:
            raise WorkbenchError(f"target token id {target} is out of range 0..{vocab - 1}")
        return target
    if not isinstance(target, str) or not target.strip():
        raise WorkbenchError("text-trigger needs a target answer (a word such as an object name, or a token id)")
    text = target if target.startswith(" ") else " " + target.strip()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        log.warning("target %r is %d tokens; the trigger aims at its first token %r", target, len(ids), tok.decode(ids[:1]))
    return int(ids[0])


@torch.no_grad()
def _last_logits(handle: ModelHandle, seqs: list[list[int]]) -> torch.Tensor:
    from workbench.tokens import pad_batch, pad_id

    ids, mask = pad_batch(seqs, pad_id(handle.tokenizer), handle.device)
    out = handle.model(input_ids=ids, attention_mask=mask).logits
    return out[torch.arange(len(seqs), device=out.device), mask.sum(1) - 1].float().cpu()


@register("text-trigger")
@dataclass(frozen=True)
class TextTrigger:
    """Search a prefix trigger that makes a causal LM answer `target`, fitted on a share of the prompts.

    `holdout`: share of prompts kept out of the search (universality is measured on them;
    with one prompt, nothing is held out). `steps`, `top_k`, `batch`: the GCG search.
    `n_controls`: random same-length triggers for the control.
    """

    n_tokens: int = 3
    steps: int = 30
    top_k: int = 32
    batch: int = 64
    holdout: float = 0.5
    n_controls: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.holdout < 1:
            raise WorkbenchError(f"holdout {self.holdout}: expected 0 <= holdout < 1")
        if self.n_tokens < 1 or self.n_controls < 1:
            raise WorkbenchError("n_tokens and n_controls must be >= 1")

    def generate(self, handle: ModelHandle, inputs: Any, target: Any, *, progress: bool = False) -> AdversarialExamples:
        """Search a trigger on the fitted share of the prompts `inputs` that makes the model answer `target`
        (a word or a token id), then measure it on all of them; `progress` shows the search."""
        from workbench.text_features import LogitObjective, allowed_tokens, token_search

        if handle.kind != "causal_lm":
            raise WorkbenchError(f"{handle.spec} is a {handle.kind} model; text triggers change a causal LM's next token")
        prompts = _prompts(inputs)
        tid = target_token(handle, target)
        tok = handle.tokenizer
        n = len(prompts)
        n_fit = n if n == 1 else max(1, round(n * (1 - self.holdout)))
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(n, generator=g).tolist()
        fit, held = sorted(order[:n_fit]), sorted(order[n_fit:])
        target_text = tok.decode([tid]).strip()
        exclude = [i for i in range(len(tok)) if target_text and tok.decode([i]).strip() == target_text] + [tid]
        allow = allowed_tokens(handle, exclude=exclude)
        res = token_search(handle, LogitObjective(target_ids=(tid,)), n_tokens=self.n_tokens, steps=self.steps,
                           seed=self.seed, contexts=[("", " " + prompts[i] if not prompts[i].startswith(" ") else prompts[i]) for i in fit],
                           top_k=self.top_k, batch=self.batch, allowed=allow, progress=progress)
        prompt_ids = [tok(" " + p if not p.startswith(" ") else p, add_special_tokens=False)["input_ids"] for p in prompts]
        bare_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        base = _last_logits(handle, bare_ids)
        trig = _last_logits(handle, [res.tokens + ids for ids in prompt_ids])
        success = trig.argmax(-1) == tid
        base_ok = base.argmax(-1) == tid
        adv_texts = [tok.decode(res.tokens + ids) for ids in prompt_ids]
        retok = _last_logits(handle, [tok(t, add_special_tokens=False)["input_ids"] for t in adv_texts])
        controls = []
        for _ in range(self.n_controls):
            rnd = allow[torch.randint(len(allow), (self.n_tokens,), generator=g)].tolist()
            controls.append(float((_last_logits(handle, [rnd + ids for ids in prompt_ids]).argmax(-1) == tid).float().mean()))

        def rate(mask: torch.Tensor, rows: list[int]) -> float | None:
            return float(mask[rows].float().mean()) if rows else None

        extra = {
            "config": asdict(self),
            "trigger": res.text,
            "trigger_tokens": res.tokens,
            "target_token_id": tid,
            "target_text": target_text,
            "n_fit": len(fit),
            "n_heldout": len(held),
            "success_fit": rate(success, fit),
            "success_heldout": rate(success, held),
            "success_retokenized": float((retok.argmax(-1) == tid).float().mean()),
            "baseline_success": float(base_ok.float().mean()),
            "control_success": sum(controls) / len(controls),
            "control_success_draws": controls,
            "target_prob_before": float(base.softmax(-1)[:, tid].mean()),
            "target_prob_after": float(trig.softmax(-1)[:, tid].mean()),
            "search_score": res.score,
            "n_evaluations": res.n_evaluations,
            "answers_before": [tok.decode([int(i)]) for i in base.argmax(-1)],
        }
        if res.diverged:
            extra["diverged"] = res.diverged
        return AdversarialExamples(
            method="text-trigger", inputs=list(prompts), adversarial=adv_texts, success=success, target=target_text,
            patch=res.text, loss_trace=[-s for s in res.trace], original_pred=base.argmax(-1),
            adversarial_pred=trig.argmax(-1), extra=extra,
        )
