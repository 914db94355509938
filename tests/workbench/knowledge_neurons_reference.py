"""Knowledge-neuron attributions one neuron at a time, without captum: a test oracle and a benchmark baseline.

For each neuron, one pass over the `steps` points of the shared path (the layer's last-position
MLP activation scaled from zero) and that neuron's gradient component, summed with the
integration method's weights. Written from public pieces (hooks, tokenization) so that it
checks `attribute_neurons` rather than sharing its code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from workbench.handle import ModelHandle
from workbench.hooks import capture, patch
from workbench.knowledge_neurons import SITE, Method
from workbench.requests import target_token_ids
from workbench.tokens import last_logits_kwargs


def _probability(handle: ModelHandle, input_ids: torch.Tensor, site: str, target_id: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """f(x) = P(target | prompt, last-position activation at `site` set to x), x: [B, d_mlp]."""
    model = handle.model
    kwargs = last_logits_kwargs(model)

    def forward(x: torch.Tensor) -> torch.Tensor:
        ids = input_ids.expand(x.shape[0], input_ids.shape[1])

        def put_last(act: torch.Tensor) -> torch.Tensor:
            return torch.cat([act[:, :-1], x.unsqueeze(1).to(act.dtype)], dim=1)

        with patch(handle, {site: put_last}):
            out = model(input_ids=ids, use_cache=False, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return torch.softmax(logits[:, -1, :].float(), dim=-1)[:, target_id]

    return forward


def attribute_neurons_reference(
    handle: ModelHandle,
    prompt: str,
    target: str | int,
    layer: int,
    *,
    neurons: Sequence[int] | None = None,
    steps: int = 20,
    method: Method = "riemann_right",
) -> torch.Tensor:
    """`attribute_neurons`' scores for one prompt and layer, neuron by neuron. Returns [len(neurons)]."""
    from captum.attr._utils.approximation_methods import approximation_parameters

    site = SITE.format(L=layer)
    target_id = target if isinstance(target, int) else target_token_ids(handle.tokenizer, target)[0]
    input_ids = torch.tensor([handle.tokenizer(prompt, add_special_tokens=True)["input_ids"]], dtype=torch.long,
                             device=handle.device)
    with torch.no_grad(), capture(handle, [site]) as acts:
        handle.model(input_ids=input_ids, use_cache=False, **last_logits_kwargs(handle.model))
    x = acts[site][0, -1].detach().float()
    which = list(range(x.shape[0])) if neurons is None else [int(n) for n in neurons]
    step_sizes_fn, alphas_fn = approximation_parameters(method)
    alphas = torch.tensor(alphas_fn(steps), dtype=torch.float32, device=x.device)
    weights = torch.tensor(step_sizes_fn(steps), dtype=torch.float32, device=x.device)
    forward = _probability(handle, input_ids, site, target_id)
    out = torch.empty(len(which), dtype=torch.float32)
    for k, neuron in enumerate(which):
        path = (alphas.unsqueeze(1) * x.unsqueeze(0)).requires_grad_(True)  # baseline 0
        (grads,) = torch.autograd.grad(forward(path).sum(), path)
        out[k] = float(x[neuron] * (weights * grads[:, neuron]).sum())
    return out
