"""The original causal-tracing scheme, as a test oracle and a benchmark baseline.

One forward pass per restoration: row 0 runs clean, rows 1.. add the noise draws to the
subject embeddings, and the restored states are copied from row 0 (about 3 x tokens x layers
passes of 1 + n_samples rows). It is written from public pieces only (hooks, tokenization,
the trace's site names and window rule), so it checks the batched engine rather than sharing
its code; it gives the same numbers, slowly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from workbench.devices import check_model_device
from workbench.handle import ModelHandle
from workbench.hooks import patch
from workbench.requests import subject_token_span, target_token_ids
from workbench.sites import require_causal_lm
from workbench.tokens import last_logits_kwargs
from workbench.tracing import KINDS, SITE_TEMPLATES, CausalTrace, embedding_std, window_layers
from workbench.tracing.engine import EMBED_SITE, check_kinds


def _last_probs(model: torch.nn.Module, input_ids: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = model(input_ids=input_ids, use_cache=False, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return torch.softmax(logits[:, -1, :].float(), dim=-1)


def _token_ids(tokenizer: Any, text: str) -> tuple[list[int], int]:
    """The prompt's ids and how many special tokens (e.g. Llama's BOS) precede the text."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    k = len(ids) - len(plain)
    return ids, k if k >= 0 and ids[k:k + len(plain)] == plain else 0


def _restored_prob(handle: ModelHandle, input_ids: torch.Tensor, span: tuple[int, int], pairs: Sequence[tuple[str, int]],
                   *, target_id: int, n_samples: int, noise_std: float, seed: int, kwargs: dict[str, Any]) -> float:
    b, e = span
    emb = handle.model.get_input_embeddings().weight
    gen = torch.Generator(device="cpu").manual_seed(seed)  # as ROME's code: the same draws for every restoration
    draws = torch.randn(n_samples, e - b, emb.shape[1], generator=gen, dtype=torch.float32) * noise_std
    draws = draws.to(device=emb.device, dtype=emb.dtype)

    def corrupt(act: torch.Tensor) -> torch.Tensor:
        new = act.clone()
        new[1:, b:e] += draws
        return new

    by_site: dict[str, list[int]] = {}
    for site, token in pairs:
        by_site.setdefault(site, []).append(token)

    def restorer(tokens: list[int]) -> Any:
        def restore(act: torch.Tensor) -> torch.Tensor:
            new = act.clone()
            for t in tokens:
                new[1:, t] = act[0, t]
            return new

        return restore

    patches: dict[str, Any] = {EMBED_SITE: corrupt}
    patches.update({site: restorer(tokens) for site, tokens in by_site.items()})
    ids = input_ids.expand(1 + n_samples, input_ids.shape[1])
    with torch.no_grad(), patch(handle, patches):
        probs = _last_probs(handle.model, ids, kwargs)
    return float(probs[1:].mean(dim=0)[target_id])


def causal_trace_reference(
    handle: ModelHandle,
    prompt: str,
    subject: str,
    *,
    target: str | None = None,
    kinds: Sequence[str] | str = KINDS,
    noise: float = 3.0,
    n_samples: int = 10,
    window: int = 10,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> CausalTrace:
    """`causal_trace`'s numbers, one restoration per forward pass."""
    require_causal_lm(handle, "causal tracing")
    kinds = check_kinds(kinds)
    dev = check_model_device(handle.device, device)
    tokenizer, model = handle.tokenizer, handle.model
    text = prompt.format(subject) if "{}" in prompt else prompt
    start, end = subject_token_span(tokenizer, prompt, subject)
    ids, shift = _token_ids(tokenizer, text)
    span = (start + shift, end + shift)
    input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
    kwargs = last_logits_kwargs(model)
    with torch.no_grad():
        clean = _last_probs(model, input_ids, kwargs)[0]
    predicted_id = int(torch.argmax(clean))
    target_id = predicted_id if target is None else target_token_ids(tokenizer, target)[0]
    noise_std = noise * embedding_std(handle)
    n_tokens, n_layers = len(ids), handle.arch.n_layers

    def prob(pairs: Sequence[tuple[str, int]]) -> float:
        return _restored_prob(handle, input_ids, span, pairs, target_id=target_id, n_samples=n_samples,
                              noise_std=noise_std, seed=seed, kwargs=kwargs)

    scores = {}
    for kind in kinds:
        template = SITE_TEMPLATES[kind]
        scores[kind] = torch.tensor([
            [prob([(template.format(L=j), token)
                   for j in ([layer] if kind == "hidden" else window_layers(layer, window, n_layers))])
             for layer in range(n_layers)]
            for token in range(n_tokens)
        ], dtype=torch.float32)
    return CausalTrace(
        prompt=text, subject=subject, tokens=tuple(tokenizer.decode([i]) for i in ids), subject_span=span,
        target=tokenizer.decode([target_id]), target_id=target_id, clean_prob=float(clean[target_id]),
        corrupted_prob=prob(()), scores=scores, noise=noise, noise_std=noise_std, n_samples=n_samples,
        window=window, seed=seed, predicted_id=predicted_id,
    )
