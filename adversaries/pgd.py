"""PGD (Madry et al.): the perturbation baseline, L-inf and L2, targeted and untargeted.

Budgets are stated in units of the model's declared input range width: with images in
[0, 1], `eps=8/255` is the usual CIFAR budget; on a model that takes [-1, 1] the same
config perturbs by 16/255 in absolute terms, i.e. the same share of the range. Images stay
in `handle.preprocess.input_range` (clamped every step) and normalization is whatever the
handle declares (see `workbench.classifier`): nothing is guessed, which is where users of
torchattacks/ART most often go wrong.

    ae = PGD(eps=8/255, steps=10).generate(handle, images, target="star")
    ae = PGD(norm="l2", eps=0.5).generate(handle, (images, labels), None)   # untargeted

Untargeted attacks push away from the given labels (or, without labels, from the model's
own clean predictions); success is "prediction differs from that label". Targeted success
is "prediction == target". A NaN/inf gradient is zeroed for that item and reported in
`extra["diverged"]`; the adversarial images are always finite.

Imports only torch and the workbench foundation (no `transformers`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from adversaries.base import AdversarialExamples
from adversaries.registry import register
from workbench.classifier import frozen, logits, predict, preprocess_of, resolve_targets, split_inputs
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.progress import progress_bar

log = logging.getLogger(__name__)

Norm = Literal["linf", "l2"]
Loss = Literal["ce", "margin"]


@register("pgd")
@dataclass(frozen=True)
class PGD:
    """Projected gradient descent under an L-inf or L2 budget.

    `eps` and `step_size` are fractions of the input range width (hi - lo). `random_start`
    draws the start uniformly in the L-inf ball (L2: a random direction at a uniform
    radius), from `seed`. `loss` "ce" is cross-entropy (torchattacks' choice); "margin" is
    the Carlini-Wagner logit margin. `early_stop` freezes items once they succeed (fewer
    wasted steps, but a different iterate than the textbook algorithm). `channels_last`
    feeds the iterate in NHWC memory layout (same numbers up to float rounding; faster
    convolutions on CPU, see benchmarks/RESULTS.md); the returned images are ordinary
    contiguous tensors. `generate` costs the loop (`pgd`) plus two forward passes, the clean
    and the final predictions.
    """

    norm: Norm = "linf"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    loss: Loss = "ce"
    seed: int = 0
    batch_size: int = 512
    early_stop: bool = False
    channels_last: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2"):
            raise WorkbenchError(f"norm {self.norm!r}: expected 'linf' or 'l2'")
        if self.loss not in ("ce", "margin"):
            raise WorkbenchError(f"loss {self.loss!r}: expected 'ce' or 'margin'")
        if not self.eps > 0 or not self.step_size > 0:
            raise WorkbenchError(f"eps={self.eps}, step_size={self.step_size}: both must be > 0 (fractions of the input range)")
        if self.steps < 1 or self.batch_size < 1:
            raise WorkbenchError(f"steps={self.steps}, batch_size={self.batch_size}: both must be >= 1")

    def generate(self, handle: ModelHandle, inputs: Any, target: Any = None) -> AdversarialExamples:
        """Attack `inputs` (images, or `(images, labels)`) toward `target` (class, name, per-item, or None)."""
        images, labels = split_inputs(handle, inputs)
        n = images.shape[0]
        targets = resolve_targets(handle, target, n)
        clean_pred, clean_prob = predict(handle, images, batch_size=self.batch_size)
        ref = targets if targets is not None else (labels if labels is not None else clean_pred)
        adv, trace, diverged = pgd(handle, images, ref, config=self, targeted=targets is not None)
        adv_pred, adv_prob = predict(handle, adv, batch_size=self.batch_size)
        success = adv_pred == targets if targets is not None else adv_pred != ref
        rows = torch.arange(n)
        extra: dict[str, Any] = {
            "config": asdict(self),
            "targeted": targets is not None,
            "clean_accuracy": float((clean_pred == labels).float().mean()) if labels is not None else None,
            "adversarial_accuracy": float((adv_pred == labels).float().mean()) if labels is not None else None,
        }
        if targets is not None:
            extra["target_prob_before"] = float(clean_prob[rows, targets].mean())
            extra["target_prob_after"] = float(adv_prob[rows, targets].mean())
        if diverged:
            extra["diverged"] = diverged
        single = int(targets[0]) if targets is not None and bool((targets == targets[0]).all()) else None
        return AdversarialExamples(
            method="pgd", inputs=images.detach().cpu(), adversarial=adv.detach().cpu(), success=success,
            target=single, perturbation=(adv - images).detach().cpu(), loss_trace=trace,
            original_pred=clean_pred, adversarial_pred=adv_pred, extra=extra,
        )


def _loss(out: torch.Tensor, ref: torch.Tensor, kind: Loss, targeted: bool) -> torch.Tensor:
    """Per-item loss that the ascent step increases."""
    if kind == "ce":
        value = F.cross_entropy(out, ref, reduction="none")
        return -value if targeted else value
    true = out.gather(1, ref[:, None])[:, 0]
    other = out.scatter(1, ref[:, None], float("-inf")).amax(1)
    return other - true if not targeted else true - other


def pgd(handle: ModelHandle, images: torch.Tensor, ref: torch.Tensor, *, config: PGD,
        targeted: bool) -> tuple[torch.Tensor, list[float], dict[str, Any] | None]:
    """The PGD loop on checked images: (adversarial images, mean loss per step, divergence record).

    `ref` holds target classes when `targeted`, else the labels to move away from.
    """
    pre = preprocess_of(handle)
    lo, hi = (float(v) for v in pre.input_range)
    scale = hi - lo
    eps, alpha = config.eps * scale, config.step_size * scale
    dev = images.device
    g = torch.Generator(device=dev).manual_seed(config.seed)
    ref = ref.to(dev)
    outs, traces = [], []
    bad_steps = torch.zeros((), device=dev, dtype=torch.long)
    first_bad = torch.full((), -1, device=dev, dtype=torch.long)  # no host sync inside the loop
    n = images.shape[0]
    bar = progress_bar(total=config.steps * ((n + config.batch_size - 1) // config.batch_size), desc="pgd",
                       enabled=config.progress, leave=False)
    with frozen(handle.model):
        for start in range(0, n, config.batch_size):
            x0 = images[start:start + config.batch_size]
            if config.channels_last and x0.ndim == 4:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            r = ref[start:start + config.batch_size]
            b = x0.shape[0]
            if config.random_start:
                if config.norm == "linf":
                    delta = (torch.rand(x0.shape, generator=g, device=dev, dtype=x0.dtype) * 2 - 1) * eps
                else:
                    delta = torch.randn(x0.shape, generator=g, device=dev, dtype=x0.dtype)
                    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(b, 1, 1, 1)
                    radius = torch.rand((b, 1, 1, 1), generator=g, device=dev, dtype=x0.dtype)
                    delta = delta / norm * radius * eps
                x = (x0 + delta).clamp(lo, hi)
            else:
                x = x0.clone()
            active = torch.ones(b, dtype=torch.bool, device=dev)
            losses = []
            for step in range(config.steps):
                x.requires_grad_(True)
                out = logits(handle, x)
                per_item = _loss(out, r, config.loss, targeted)
                (grad,) = torch.autograd.grad(per_item.sum(), x)
                losses.append(per_item.detach().mean())
                finite = grad.mul(0).sum(dim=tuple(range(1, grad.ndim))) == 0  # NaN for an item with NaN/inf
                nonfinite = (~finite).any()
                bad_steps = bad_steps + nonfinite.long()
                first_bad = torch.where((first_bad < 0) & nonfinite, step, first_bad)
                grad = torch.where(finite.view(-1, 1, 1, 1), grad, 0.0)
                with torch.no_grad():
                    if config.norm == "linf":
                        step_vec = grad.sign()
                    else:
                        gn = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                        step_vec = grad / gn
                    if config.early_stop:
                        pred = out.argmax(1)
                        done = pred == r if targeted else pred != r
                        active = active & ~done
                        step_vec = step_vec * active.view(-1, 1, 1, 1)
                    x = x.detach() + alpha * step_vec
                    delta = x - x0
                    if config.norm == "linf":
                        delta = delta.clamp(-eps, eps)
                    else:
                        dn = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                        delta = delta * torch.clamp(eps / dn.clamp_min(1e-12), max=1.0)
                    x = (x0 + delta).clamp(lo, hi)
                bar.update(1)
            outs.append(x.detach().contiguous())
            traces.append(torch.stack(losses) * (b / n))
    bar.close()
    adv = outs[0] if len(outs) == 1 else torch.cat(outs)
    trace = [float(v) for v in torch.stack(traces).sum(0).cpu()]
    diverged = None
    if int(bad_steps):
        diverged = {"step": int(first_bad), "what": "non-finite input gradient", "steps_affected": int(bad_steps),
                    "action": "zeroed that item's step; images stay finite"}
        log.warning("pgd: non-finite gradients at step %d (%d steps affected)", int(first_bad), int(bad_steps))
    return adv, trace, diverged
