"""Text in and out of a language model: prompt encoding, padding, and sampled continuations.

Every method that feeds token ids to a model goes through these few functions, so prompts
are encoded the same way (a leading BOS kept, a trailing EOS dropped), batches are padded
the same way (on the right, so the positions of real tokens are exact for causal models)
and continuations are sampled the same way (top-k with a seeded generator, KV cache).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids a causal LM sees for `text`: leading special tokens (a BOS) kept, trailing ones dropped.

    Targets are appended after these ids, so a tokenizer that also appends EOS must not
    put it between the prompt and the target.
    """
    bare = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(text)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start + len(bare)]
    return bare


def prompt_offset(tokenizer: Any, text: str) -> int:
    """How many special tokens `encode_prompt` puts before the text's own tokens."""
    return len(encode_prompt(tokenizer, text)) - len(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_id(tokenizer: Any) -> int:
    """The id that fills padded positions: the tokenizer's pad token, else EOS, else UNK, else 0."""
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def pad_batch(seqs: Sequence[Sequence[int]], pad: int,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `(ids, attention_mask)` of shape (len(seqs), longest), both long, on `device`."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def context_length(model: torch.nn.Module) -> int | None:
    """The model's maximum number of positions (`n_positions` / `max_position_embeddings`), if it says."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def check_fits(model: torch.nn.Module, n_tokens: int, what: str) -> None:
    """Refuse a sequence of `n_tokens` longer than the model's positions (`context_length`); `what` names it."""
    from workbench.errors import WorkbenchError

    limit = context_length(model)
    if limit is not None and n_tokens > limit:
        raise WorkbenchError(f"{what} is {n_tokens} tokens long, and the model takes at most {limit} positions; "
                             f"shorten it to {limit} tokens or fewer")


TOKENIZER_FILES = ("tokenizer.json, or tokenizer_config.json with the vocabulary files (vocab.json and merges.txt, "
                   "tokenizer.model, or vocab.txt)")


def has_vocabulary(tokenizer: Any) -> bool:
    """False for no tokenizer, and for the empty one transformers builds for a folder without tokenizer files."""
    if tokenizer is None:
        return False
    size = getattr(tokenizer, "vocab_size", None)
    return not isinstance(size, int) or size > 0


def missing_tokenizer(spec: str, path: Any = None) -> str:
    """What to say when a text model has no usable tokenizer: where it was looked for and which files make one."""
    where = f"the folder {path}" if path is not None else spec
    return (f"{where} holds no tokenizer: a tokenizer needs {TOKENIZER_FILES}; save one there with "
            "tokenizer.save_pretrained(folder)")


def last_logits_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    """Keyword arguments that make a causal LM compute logits for the last position only, where it can."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def sample_tokens(model: torch.nn.Module, ids: torch.Tensor, steps: int, *, top_k: int | None,
                  generator: torch.Generator) -> torch.Tensor:
    """`steps` new tokens after `ids` (a batch of equal-length prompts), top-k sampled, using the KV cache.

    `top_k=None` is greedy. The draws come from `generator` on the CPU, so the same seed gives
    the same text on every device.
    """
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5 renamed it
    new = torch.zeros((ids.shape[0], 0), dtype=torch.long, device=ids.device)
    past = None
    current = ids
    for _ in range(steps):
        output = model(input_ids=current, use_cache=True, **{cache_kw: past})
        past = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        logits = output.logits[:, -1].float().cpu()
        if top_k is None:
            nxt = logits.argmax(-1)
        else:
            k = min(top_k, logits.shape[-1])
            vals, idx = logits.topk(k, dim=-1)
            choice = torch.multinomial(torch.softmax(vals, dim=-1), 1, generator=generator).squeeze(-1)
            nxt = idx.gather(-1, choice[:, None]).squeeze(-1)
        nxt = nxt.to(ids.device)
        new = torch.cat([new, nxt[:, None]], dim=1)
        current = nxt[:, None]
    return new


__all__ = ["TOKENIZER_FILES", "check_fits", "context_length", "encode_prompt", "has_vocabulary", "last_logits_kwargs",
           "missing_tokenizer", "pad_batch", "pad_id", "prompt_offset", "sample_tokens"]
