"""Fine-tuning baselines for fact editing: FT and FT-L (ROME paper, section 4).

FT nudges one layer's MLP weights with Adam until the rewrite prompt (and a few variants of
it behind short prefixes the model wrote itself) continues with `target_new`; nothing keeps
the change small or local. FT-L is the same with an L-infinity constraint: after every step
the change is clamped to [-epsilon, epsilon] element-wise, so the edited weights stay in
[w0 - epsilon, w0 + epsilon]. They are the baselines that ROME and MEMIT are measured against.

The change itself is the trained tensor: training runs the model with `W0 + D` substituted
for the chosen weights (`torch.func.functional_call`), so the model is never written and the
delta is exactly the `D` that was evaluated. The result is a dense `WeightDelta`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

import torch
from torch.func import functional_call

from editors.registry import register
from workbench.delta import WeightDelta, assert_unchanged
from workbench.errors import WorkbenchError, require_finite
from workbench.handle import ModelHandle
from workbench.requests import Rewrite, target_token_ids
from workbench.sites import require_causal_lm
from workbench.tokens import encode_prompt

log = logging.getLogger(__name__)

WeightChoice = Literal["mlp_out", "mlp_in", "both"]


# ---- shared checks (also used by editors.knowledge_neuron_edit) -------------------------

def as_rewrites(request: Rewrite | Sequence[Rewrite], method: str) -> list[Rewrite]:
    """One rewrite or several, as a non-empty list (an error names what was passed instead)."""
    rewrites = [request] if isinstance(request, Rewrite) else list(request)
    if not rewrites:
        raise WorkbenchError(f"{method}: no rewrite given; pass a Rewrite or a non-empty list of them")
    for i, rw in enumerate(rewrites):
        if not isinstance(rw, Rewrite):
            raise WorkbenchError(f"{method}: request {i} is a {type(rw).__name__}, not a workbench.requests.Rewrite")
    return rewrites


def request_json(rewrites: Sequence[Rewrite]) -> Any:
    """The delta's `request` metadata: one rewrite's JSON, or a list for a batch."""
    return rewrites[0].to_json() if len(rewrites) == 1 else [rw.to_json() for rw in rewrites]


def default_layer(handle: ModelHandle) -> int:
    """A middle layer: where causal traces of factual recall usually peak."""
    return handle.arch.n_layers // 2


# ---- the training data: prompt -> target tokens ----------------------------------------

@torch.no_grad()
def context_prefixes(handle: ModelHandle, *, n: int, length: int, seed: int) -> list[str]:
    """`n` short texts sampled from the model itself (top-5, seeded), used as prompt prefixes.

    As ROME's context templates: the edit must hold after ordinary text the model would
    write, not only at the start of a document.
    """
    if n <= 0 or length <= 0:
        return []
    tok = handle.tokenizer
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    device = handle.device
    ids = (torch.full((n, 1), start, dtype=torch.long, device=device) if start is not None
           else tok(["The"] * n, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    special = set(tok.all_special_ids)
    for _ in range(length):
        logits = handle.model(input_ids=ids).logits[:, -1].float().cpu()
        if special:
            logits[:, sorted(i for i in special if i < logits.shape[-1])] = float("-inf")
        top = logits.topk(min(5, logits.shape[-1]), dim=-1)
        pick = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=gen)
        ids = torch.cat([ids, top.indices.gather(1, pick).to(device)], dim=1)
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    return [" ".join(t.split()).strip(" .") for t in texts]


@dataclass(frozen=True)
class TargetBatch:
    """Right-padded prompt+target sequences and where each target token is predicted."""

    input_ids: torch.Tensor  # (n, length)
    attention_mask: torch.Tensor  # (n, length)
    positions: torch.Tensor  # (n, t_max): position whose logits predict target token j
    targets: torch.Tensor  # (n, t_max): target token ids (pad: 0)
    target_mask: torch.Tensor  # (n, t_max): 1 for real target tokens

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> TargetBatch:
        return TargetBatch(*(t[start:stop] for t in (self.input_ids, self.attention_mask, self.positions,
                                                        self.targets, self.target_mask)))

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-example mean log-probability of the target tokens, (n,)."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        rows = torch.arange(len(self), device=logits.device).unsqueeze(1)
        picked = lp[rows, self.positions, self.targets] * self.target_mask
        return picked.sum(1) / self.target_mask.sum(1)


def encode_targets(tokenizer: Any, texts: Sequence[str], targets: Sequence[str], *,
                   device: torch.device | str = "cpu") -> TargetBatch:
    """Tokenize `text + target` pairs for teacher-forced target log-probabilities."""
    if len(texts) != len(targets):
        raise WorkbenchError(f"{len(texts)} texts but {len(targets)} targets; give one target per text")
    seqs, starts, tgts = [], [], []
    for text, target in zip(texts, targets):
        prompt = encode_prompt(tokenizer, text)  # BOS kept, a trailing EOS dropped
        if not prompt:
            raise WorkbenchError(f"prompt {text!r} tokenizes to nothing")
        tids = target_token_ids(tokenizer, target)
        seqs.append(prompt + tids[:-1])
        starts.append(len(prompt) - 1)
        tgts.append(tids)
    n, length, t_max = len(seqs), max(map(len, seqs)), max(map(len, tgts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((n, length), pad, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    positions = torch.zeros((n, t_max), dtype=torch.long)
    target_ids = torch.zeros((n, t_max), dtype=torch.long)
    target_mask = torch.zeros((n, t_max))
    for i, (seq, start, tids) in enumerate(zip(seqs, starts, tgts)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        positions[i, : len(tids)] = torch.arange(start, start + len(tids))
        target_ids[i, : len(tids)] = torch.tensor(tids)
        target_mask[i, : len(tids)] = 1
    return TargetBatch(*(t.to(device) for t in (input_ids, mask, positions, target_ids, target_mask)))


@torch.no_grad()
def target_probabilities(handle: ModelHandle, texts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
    """P(target | text) for each pair (product over the target's tokens), float64 on the CPU."""
    batch = encode_targets(handle.tokenizer, texts, targets, device=handle.device)
    logits = handle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return (batch.log_probs(logits) * batch.target_mask.sum(1)).double().exp().cpu()


def _float_at_most(value: float, dtype: torch.dtype) -> float:
    """The largest `dtype` number <= value (float32 rounds 1e-3 up, past the promised bound)."""
    t = torch.tensor(value, dtype=dtype)
    if float(t) > value:
        t = torch.nextafter(t, torch.zeros_like(t))
    return float(t)


# ---- the editors ---------------------------------------------------------------------

@register("ft")
@dataclass(frozen=True)
class FineTune:
    """FT: Adam on one layer's MLP weights to make `target_new` likely; unconstrained.

    `layer=None` picks the middle layer. `weights` chooses the MLP output projection
    (default, as in the ROME paper), the input projection (`mlp_in`; for Llama-style
    models `up_proj`), or both (plus Llama's `gate_proj`). The ROME paper's GPT-2 XL lr,
    5e-4, moves a small model's fact nothing in 25 steps; the default 5e-3 does (and, as FT
    does, spills onto neighbours). Each rewrite trains on its prompt
    and on `n_prefixes` copies behind model-written prefixes of `prefix_length` tokens;
    training stops early once the mean target NLL falls below `stop_loss`.
    """

    layer: int | None = None
    weights: WeightChoice = "mlp_out"
    steps: int = 25
    lr: float = 5e-3
    n_prefixes: int = 4
    prefix_length: int = 8
    seed: int = 0
    stop_loss: float | None = 1e-2
    weight_decay: float = 0.0
    batch_size: int | None = None  # examples per forward pass (gradients accumulate); None = all

    method: ClassVar[str] = "ft"

    def __post_init__(self) -> None:
        require_finite(self)
        if self.weights not in ("mlp_out", "mlp_in", "both"):
            raise WorkbenchError(f"weights must be 'mlp_out', 'mlp_in' or 'both'; got {self.weights!r}")
        if self.steps < 1:
            raise WorkbenchError(f"steps must be at least 1; got {self.steps}")
        if not self.lr > 0:
            raise WorkbenchError(f"lr must be positive; got {self.lr}")
        if self.n_prefixes < 0 or self.prefix_length < 0:
            raise WorkbenchError("n_prefixes and prefix_length must be >= 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise WorkbenchError(f"batch_size must be a positive number or None; got {self.batch_size}")

    # The L-inf bound; None for plain FT.
    def _epsilon(self) -> float | None:
        return None

    def param_names(self, handle: ModelHandle, layer: int) -> list[str]:
        site_map = require_causal_lm(handle, self.method, weight_role="mlp_out")
        roles = {"mlp_out": ["mlp_out"], "mlp_in": ["mlp_in"],
                 "both": ["mlp_in", "mlp_gate", "mlp_out"]}[self.weights]
        roles = [r for r in roles if r in site_map.weights]
        return [site_map.weight_name(handle.model, role, layer) for role in roles]

    def fit(self, handle: ModelHandle, request: Rewrite | Sequence[Rewrite]) -> WeightDelta:
        """Train the change on the rewrite(s); the model is left exactly as it was."""
        site_map = require_causal_lm(handle, self.method, weight_role="mlp_out")
        rewrites = as_rewrites(request, self.method)
        layer = default_layer(handle) if self.layer is None else self.layer
        n = site_map.n_layers(handle.model)
        if not isinstance(layer, int) or not 0 <= layer < n:
            raise WorkbenchError(f"layer {layer!r} is out of range; {handle.spec} has layers 0..{n - 1}")
        names = self.param_names(handle, layer)
        model = handle.model
        with assert_unchanged(model, names):
            changes, info = self._train(handle, rewrites, names)
        delta = WeightDelta.from_model(
            model, changes, method=self.method, request=request_json(rewrites),
            extra={"config": asdict(self), "layer": layer, "params": names, **info},
        )
        log.info("%s: layer %d, %d rewrite(s), %d steps, loss %.4g -> %.4g, max |delta| %.3g, norms %s",
                 self.method, layer, len(rewrites), info["steps_run"], info["losses"][0], info["final_loss"],
                 info["max_abs_change"], {k: round(v, 4) for k, v in delta.norms().items()})
        return delta

    def _train(self, handle: ModelHandle, rewrites: list[Rewrite], names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        started = time.perf_counter()
        model = handle.model
        eps = self._epsilon()
        params = dict(model.named_parameters())
        prefixes = context_prefixes(handle, n=self.n_prefixes, length=self.prefix_length, seed=self.seed)
        texts, targets = [], []
        for rw in rewrites:
            for text in [rw.text, *(f"{p}. {rw.text}" for p in prefixes)]:
                texts.append(text)
                targets.append(rw.target_new)
        batch = encode_targets(handle.tokenizer, texts, targets, device=handle.device)
        size = self.batch_size or len(batch)
        base = {name: params[name].detach() for name in names}
        deltas = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device, requires_grad=True)
                  for name, p in base.items()}
        opt = torch.optim.Adam(list(deltas.values()), lr=self.lr, weight_decay=self.weight_decay)
        losses: list[float] = []
        was_training = model.training
        model.eval()  # no dropout: the same request gives the same delta
        try:
            for _ in range(self.steps):
                grads = [torch.zeros_like(d) for d in deltas.values()]
                total = 0.0
                for start in range(0, len(batch), size):
                    part = batch.rows(start, start + size)
                    weights = {name: (base[name].float() + d).to(base[name].dtype) for name, d in deltas.items()}
                    out = functional_call(model, weights, args=(),
                                          kwargs={"input_ids": part.input_ids, "attention_mask": part.attention_mask})
                    loss = -part.log_probs(out.logits).sum() / len(batch)
                    for g, new in zip(grads, torch.autograd.grad(loss, list(deltas.values()))):
                        g += new
                    total += float(loss.detach())
                losses.append(total)
                if not math.isfinite(total):
                    raise WorkbenchError(f"{self.method}: the loss became {total} at step {len(losses)}; lower lr (now {self.lr})")
                if self.stop_loss is not None and total < self.stop_loss:
                    break
                for d, g in zip(deltas.values(), grads):
                    d.grad = g
                opt.step()
                if eps is not None:
                    with torch.no_grad():
                        for d in deltas.values():
                            bound = _float_at_most(eps, d.dtype)
                            d.clamp_(-bound, bound)
        finally:
            model.train(was_training)
        # The loss after the last step (the loop measured it before each step).
        with torch.no_grad():
            weights = {name: (base[name].float() + d).to(base[name].dtype) for name, d in deltas.items()}
            final = 0.0
            for start in range(0, len(batch), size):
                part = batch.rows(start, start + size)
                out = functional_call(model, weights, args=(),
                                      kwargs={"input_ids": part.input_ids, "attention_mask": part.attention_mask})
                final += float(-part.log_probs(out.logits).sum() / len(batch))
        changes = {name: d.detach().clone() for name, d in deltas.items()}
        info = {
            "losses": losses,
            "final_loss": final,
            "steps_run": len(losses),
            "prefixes": prefixes,
            "n_examples": len(batch),
            "max_abs_change": max(float(c.abs().max()) for c in changes.values()),
            "seconds": time.perf_counter() - started,
        }
        return changes, info


@register("ft-l")
@dataclass(frozen=True)
class FineTuneL(FineTune):
    """FT-L: FT with the change clamped to [-epsilon, epsilon] after every Adam step.

    The dense delta therefore never exceeds `epsilon` in any entry (the ROME paper's FT+L).
    The paper's GPT-2 XL setting, epsilon = lr = 5e-4, moves nothing in a 128-wide model
    with 512 MLP neurons, whose mlp_out entries have a std of about 0.025; the default 0.05
    is of that entries' order. Pick epsilon for your model's width.
    """

    epsilon: float = 5e-2
    lr: float = 1e-2

    method: ClassVar[str] = "ft-l"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.epsilon > 0:
            raise WorkbenchError(f"epsilon must be positive; got {self.epsilon}")

    def _epsilon(self) -> float | None:
        return self.epsilon
