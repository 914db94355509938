"""Shared machinery of ROME and MEMIT: subject keys, target values, key statistics, layouts.

Both methods treat an MLP's output projection W_out as a linear associative memory: the
key k is what the projection reads (the MLP's hidden activation, site
`blocks.{L}.mlp.hook_post`) at the subject's last token, and the value is what it writes.
An edit needs

- k*: the subject's key, averaged over the rewrite prompt behind a few sampled prefixes
  (so the edit does not depend on the exact context),
- v* (as a change delta of an activation at the subject's last token): found by gradient
  descent so that the model assigns high probability to target_new on the prefixed prompts,
  with a KL penalty on "{subject} is a" (keep what the model otherwise knows about the
  subject: its "essence") and a norm clamp relative to the original activation,
- C = E[k k^T]: the second moment of keys over a corpus, so that the update disturbs
  typical keys as little as possible (via `workbench.statistics.collect_statistics`,
  cached on disk by model fingerprint, site, corpus and sample count).

Deltas are computed in the `(d_out, d_in)` view and converted to the parameter's own
layout (GPT-2's Conv1D stores `(d_in, d_out)`).
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from workbench.delta import LowRank
from workbench.devices import model_device
from workbench.errors import WorkbenchError
from workbench.hooks import capture, edit
from workbench.requests import Rewrite, subject_token_span, target_token_ids
from workbench.sites import Layout, as_out_in
from workbench.tokens import encode_prompt, pad_batch, pad_id, prompt_offset, sample_tokens

log = logging.getLogger(__name__)

ValueSite = Literal["mlp_out", "resid_post"]
FactToken = Literal["subject_last", "prompt_last"]
ESSENCE_PROMPT = "{} is a"


# --- sites, layers, weights -------------------------------------------------------------------

def key_site(layer: int) -> str:
    """The MLP key: input of the output projection (after the nonlinearity / gating)."""
    return f"blocks.{layer}.mlp.hook_post"


def value_site(kind: ValueSite, layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_out" if kind == "mlp_out" else f"blocks.{layer}.hook_resid_post"


def check_layer(handle: Any, layer: Any) -> int:
    n = int(handle.arch.n_layers)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise WorkbenchError(f"layer {layer!r} is out of range: {handle.spec} has {n} layers, choose 0..{n - 1}")
    return layer


@dataclass(frozen=True)
class MLPOut:
    """The output projection of one MLP: parameter name, layout and sizes."""

    name: str
    layout: Layout
    d_out: int
    d_in: int


def mlp_out(handle: Any, layer: int) -> tuple[MLPOut, nn.Parameter]:
    site_map = handle.arch.site_map
    param, layout = site_map.weight(handle.model, "mlp_out", layer)
    name = site_map.weight_name(handle.model, "mlp_out", layer)
    d_out, d_in = as_out_in(param, layout).shape
    return MLPOut(name, layout, int(d_out), int(d_in)), param


def in_layout(u_out: torch.Tensor, v_in: torch.Tensor, layout: Layout) -> LowRank:
    """Low-rank change `u_out @ v_in.T` in the (d_out, d_in) view, expressed in `layout`."""
    u_out, v_in = u_out.reshape(u_out.shape[0], -1), v_in.reshape(v_in.shape[0], -1)
    return LowRank(u_out, v_in) if layout == "out_in" else LowRank(v_in, u_out)


def dense_in_layout(change_out_in: torch.Tensor, layout: Layout) -> torch.Tensor:
    return change_out_in if layout == "out_in" else change_out_in.T.contiguous()


# --- prompts ---------------------------------------------------------------------------------

def _clean_prefix(text: str) -> str:
    return " ".join(text.replace("{", "(").replace("}", ")").split())


def sample_texts(
    handle: Any,
    n: int,
    *,
    length: int,
    seed: int,
    batch_size: int = 64,
    top_k: int | None = 5,
) -> list[str]:
    """`n` texts of `length` tokens sampled from the model itself, starting after its BOS/EOS token.

    Used for ROME's context prefixes and, for models without a named corpus, as the text
    over which key statistics are collected. Sampled from the `top_k` most likely tokens
    (ROME's code uses 5); `top_k=None` is greedy, which gives `n` copies of one text.
    """
    tok, model = handle.tokenizer, handle.model
    start = next((getattr(tok, a) for a in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if getattr(tok, a, None) is not None), 0)
    gen = torch.Generator().manual_seed(seed)
    device = model_device(model)
    out: list[str] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            while len(out) < n:
                b = min(batch_size, n - len(out))
                ids = torch.full((b, 1), int(start), dtype=torch.long, device=device)
                new = sample_tokens(model, ids, length, top_k=top_k, generator=gen)
                out.extend(tok.decode(row.tolist(), skip_special_tokens=True) for row in new)
    finally:
        model.train(was_training)
    return out


PrefixSource = Literal["generated", "world"]


MAX_STAT_SAMPLES = 10_000_000  # key-statistics tokens: ROME uses 100,000; ten million take hours on a CPU


def check_stat_samples(n_samples: int, who: str = "") -> None:
    """Refuse a number of key-statistics tokens outside 1..MAX_STAT_SAMPLES (before any corpus is built)."""
    if not 1 <= n_samples <= MAX_STAT_SAMPLES:
        raise WorkbenchError(f"{who}mom2_n_samples={n_samples}: expected 1..{MAX_STAT_SAMPLES} tokens of key "
                             "statistics (ROME: 100000)")


def check_prefix_source(source: str, who: str = "") -> None:
    """Refuse a context-prefix source other than the `PrefixSource` values."""
    if source not in get_args(PrefixSource):
        raise WorkbenchError(f"{who}prefix_source={source!r}; expected 'generated' or 'world'")


def context_templates(handle: Any, *, n_prefixes: int, length: int, seed: int,
                      source: PrefixSource = "generated") -> list[str]:
    """"{}" plus `n_prefixes` context prefixes "<text> {}" (where the rewrite prompt goes).

    `source="generated"` samples the prefixes from the model (ROME/MEMIT's recipe, for any
    model); `"world"` takes plain filler sentences from the zoo model's own world, the kind
    of context its training put before facts (a model's samples can name other subjects).
    """
    check_prefix_source(source)
    if n_prefixes <= 0:
        return ["{}"]
    if source == "world":
        world = getattr(handle, "world", None)
        if world is None or not hasattr(world, "filler"):
            raise WorkbenchError(f"prefix source 'world' needs a zoo model trained on a world ({handle.spec} has "
                                 "none); use prefix_source='generated'")
        return ["{}"] + [f"{text} {{}}" for text in world.filler(n_prefixes, seed=seed + 7919, sentences=(1, 1))]
    texts = sample_texts(handle, n_prefixes, length=length, seed=seed)
    return ["{}"] + [f"{_clean_prefix(t)}. {{}}" if _clean_prefix(t) else "{}" for t in texts]


@dataclass(frozen=True)
class Located:
    """A prompt as token ids with the position of the subject's last token."""

    ids: list[int]
    subject_last: int


def locate(tokenizer: Any, template: str, prompt: str, subject: str,
           fact_token: FactToken = "subject_last") -> Located:
    """Fill `prompt` ("...{}...") with `subject`, put it into `template` ("prefix {}"), find the subject.

    The subject's character span is known exactly (where "{}" was), so a subject that also
    occurs in the prefix or prompt text cannot confuse the position. With
    `fact_token="prompt_last"` the edit position is the prompt's last token instead (ROME's
    "last" option, for models that look facts up at the end of the prompt).
    """
    if "{}" not in prompt:
        raise WorkbenchError(f"prompt {prompt!r} has no '{{}}' where the subject goes")
    head = template.split("{}", 1)[0]
    filled = prompt.replace("{}", subject, 1)
    text = template.replace("{}", filled, 1)
    start = len(head) + prompt.index("{}")
    end = start + len(subject)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    last = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    if not last:
        subject_token_span(tokenizer, text, subject)  # raises with the tokens
        raise WorkbenchError(f"subject {subject!r} covers no token of {text!r}")
    ids = encode_prompt(tokenizer, text)
    if fact_token == "prompt_last":
        return Located(ids, len(ids) - 1)
    return Located(ids, prompt_offset(tokenizer, text) + last[-1])


# --- keys ------------------------------------------------------------------------------------

@torch.no_grad()
def site_at_subject(
    handle: Any,
    site: str,
    located: Sequence[Located],
    *,
    batch_size: int = 64,
) -> torch.Tensor:
    """The activation at `site` at each prompt's subject-last position, [n, dim] (float32)."""
    model = handle.model
    device = model_device(model)
    pad = pad_id(handle.tokenizer)
    out = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(located), batch_size):
            chunk = located[start:start + batch_size]
            ids, mask = pad_batch([c.ids for c in chunk], pad, device)
            with capture(handle, [site], stop=True) as acts:
                model(input_ids=ids, attention_mask=mask)
            act = acts[site]
            pos = torch.tensor([c.subject_last for c in chunk], device=act.device)
            out.append(act[torch.arange(len(chunk), device=act.device), pos].float())
    finally:
        model.train(was_training)
    return torch.cat(out)


def subject_keys(
    handle: Any,
    layer: int,
    rewrites: Sequence[Rewrite],
    templates: Sequence[str],
    *,
    batch_size: int = 64,
    fact_token: FactToken = "subject_last",
) -> torch.Tensor:
    """k* per rewrite: the MLP key at the subject's last token, averaged over the context templates."""
    located = [locate(handle.tokenizer, t, rw.prompt, rw.subject, fact_token) for rw in rewrites for t in templates]
    keys = site_at_subject(handle, key_site(layer), located, batch_size=batch_size)
    return keys.reshape(len(rewrites), len(templates), -1).mean(dim=1)


# --- values ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ValueResult:
    """Optimized activation changes at the subject's last token, one row per rewrite."""

    delta: torch.Tensor  # [n, d_model]
    init: torch.Tensor  # the original activation at the subject's last token (plain prompt)
    nll_before: list[float]  # mean per-token NLL of target_new over the contexts
    nll_after: list[float]
    steps: list[int]  # optimization steps each rewrite took


@dataclass(frozen=True)
class ValueConfig:
    """v* optimization settings (defaults follow ROME's GPT-2 XL hyper-parameters in spirit)."""

    lr: float = 0.5
    steps: int = 20
    kl_factor: float = 0.0625
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    stop_nll: float = 0.05
    batch_requests: int = 64
    fact_token: FactToken = "subject_last"
    # One delta per subject for all of that subject's rewrites (several facts of one subject in a
    # batch): its last-token state is one vector, so per-rewrite deltas would pull it apart.
    joint_subject: bool = False


def _logits_at(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
    """Logits only at (row, position) pairs: the unembedding of a whole batch is most of the memory."""
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, positions]
    hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return head(hidden[rows, positions])


class _Replay(nn.Module):
    """Stands in for a block: returns what the block returned on the first pass, whatever it is given."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def _detached(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, tuple):
        return tuple(_detached(o) for o in output)
    return output


class BlocksReplayed:
    """The blocks below `layer` compute once, then replay their outputs (`with` block; restored after).

    Value optimization runs the same batch through the model every step and changes only an
    activation at `layer` or above, so everything the blocks below compute is the same each
    time: replaying it skips `layer` of the model's blocks per step (ROME at GPT-2 XL's layer 17
    of 48: a third), with bit-identical results. The first `forward` records; later ones replay.
    """

    def __init__(self, handle: Any, layer: int) -> None:
        self.blocks: nn.ModuleList | None = None
        self.layer = layer
        site_map = getattr(handle.arch, "site_map", None)
        if layer > 0 and site_map is not None:
            path = site_map.module_path(handle.model, site_map.layers, None)
            blocks = handle.model.get_submodule(path) if path else None
            if isinstance(blocks, nn.ModuleList) and len(blocks) > layer:
                self.blocks = blocks
        self._originals: list[nn.Module] = []
        self._handles: list[Any] = []
        self._outputs: dict[int, Any] = {}

    def __enter__(self) -> BlocksReplayed:
        if self.blocks is not None:
            for i in range(self.layer):
                self._handles.append(self.blocks[i].register_forward_hook(self._recorder(i)))
        return self

    def _recorder(self, index: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            self._outputs[index] = _detached(output)
        return hook

    def recorded(self) -> None:
        """Call after the first forward: from now on the blocks below `layer` replay."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.blocks is None or self._originals or len(self._outputs) != self.layer:
            return
        self._originals = [self.blocks[i] for i in range(self.layer)]
        for i in range(self.layer):
            self.blocks[i] = _Replay(self._outputs[i])

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.blocks is not None:
            for i, block in enumerate(self._originals):
                self.blocks[i] = block
        self._originals = []
        self._outputs.clear()


def optimize_values(
    handle: Any,
    rewrites: Sequence[Rewrite],
    *,
    layer: int,
    site_kind: ValueSite,
    templates: Sequence[str],
    config: ValueConfig,
    progress: bool = False,
) -> ValueResult:
    """Find, per rewrite, the change delta of the activation at `site_kind`/`layer` (subject's last token)
    that makes target_new likely after every context template, with the KL and norm guards.

    Rewrites are optimized in chunks of `config.batch_requests`; each has its own delta and its own
    loss term, so batching does not couple them, except with `config.joint_subject`: then the
    rewrites of one subject share one delta (fitted to all their losses; kept in one chunk). A
    rewrite (or subject) stops moving once its NLL is below `config.stop_nll`. The model's
    parameters are not touched (gradients flow to delta only).
    """
    model = handle.model
    n = len(rewrites)
    delta_rows: list[torch.Tensor | None] = [None] * n
    init_rows: list[torch.Tensor | None] = [None] * n
    before, after, steps = [0.0] * n, [0.0] * n, [0] * n
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(False)
        done = 0
        for chunk in _value_chunks(rewrites, config):
            items = [rewrites[i] for i in chunk]
            groups = _subject_groups(items) if config.joint_subject else list(range(len(items)))
            result = _optimize_chunk(handle, items, layer=layer, site_kind=site_kind, templates=templates,
                                     config=config, groups=groups)
            for j, i in enumerate(chunk):
                delta_rows[i], init_rows[i] = result.delta[j], result.init[j]
                before[i], after[i], steps[i] = result.nll_before[j], result.nll_after[j], result.steps[j]
            done += len(chunk)
            if progress:
                log.info("values %d/%d", done, n)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)
    return ValueResult(torch.stack(delta_rows), torch.stack(init_rows), before, after, steps)  # type: ignore[arg-type]


def _subject_groups(rewrites: Sequence[Rewrite]) -> list[int]:
    """Group index of each rewrite, one group per distinct subject (in order of first appearance)."""
    index: dict[str, int] = {}
    return [index.setdefault(rw.subject, len(index)) for rw in rewrites]


def _value_chunks(rewrites: Sequence[Rewrite], config: ValueConfig) -> list[list[int]]:
    """Indices per optimization chunk: `batch_requests` rewrites each, or whole subjects when joint."""
    if not config.joint_subject:
        return [list(range(s, min(s + config.batch_requests, len(rewrites))))
                for s in range(0, len(rewrites), config.batch_requests)]
    by_subject: dict[str, list[int]] = {}
    for i, rw in enumerate(rewrites):
        by_subject.setdefault(rw.subject, []).append(i)
    chunks: list[list[int]] = [[]]
    for members in by_subject.values():
        if chunks[-1] and len(chunks[-1]) + len(members) > config.batch_requests:
            chunks.append([])
        chunks[-1].extend(members)
    return chunks


def _optimize_chunk(handle: Any, rewrites: list[Rewrite], *, layer: int, site_kind: ValueSite,
                    templates: Sequence[str], config: ValueConfig, groups: Sequence[int]) -> ValueResult:
    """Optimize one delta per group (`groups[i]`: rewrite i's group); rows are returned per rewrite."""
    model, tok = handle.model, handle.tokenizer
    device = model_device(model)
    pad = pad_id(tok)
    site = value_site(site_kind, layer)
    n = len(rewrites)
    n_groups = max(groups) + 1
    group_t = torch.tensor(list(groups), device=device)
    first = [list(groups).index(g) for g in range(n_groups)]  # the rewrite whose activation scales its group

    # Target rows: every rewrite behind every template, target teacher-forced.
    rows, owner, subj_pos, tgt_rows, tgt_pos, tgt_ids, tgt_owner, tgt_weight = [], [], [], [], [], [], [], []
    for i, rw in enumerate(rewrites):
        target = target_token_ids(tok, rw.target_new)
        for t in templates:
            loc = locate(tok, t, rw.prompt, rw.subject, config.fact_token)
            r = len(rows)
            rows.append(loc.ids + target[:-1])
            owner.append(i)
            subj_pos.append(loc.subject_last)
            for j, token in enumerate(target):
                tgt_rows.append(r)
                tgt_pos.append(len(loc.ids) - 1 + j)
                tgt_ids.append(token)
                tgt_owner.append(i)
                tgt_weight.append(1.0 / (len(target) * len(templates)))
    # Essence rows: "{subject} is a", next-token distribution at the last position.
    ess_first = len(rows)
    ess_last_pos = []
    for i, rw in enumerate(rewrites):
        loc = locate(tok, "{}", ESSENCE_PROMPT, rw.subject, config.fact_token)
        rows.append(loc.ids)
        owner.append(i)
        subj_pos.append(loc.subject_last)
        ess_last_pos.append(len(loc.ids) - 1)
    # The plain prompt, for the original activation (clamp scale and MEMIT's targets).
    plain = [locate(tok, "{}", rw.prompt, rw.subject, config.fact_token) for rw in rewrites]
    init = site_at_subject(handle, site, plain)

    ids, mask = pad_batch(rows, pad, device)
    owner_t = torch.tensor(owner, device=device)
    subj_t = torch.tensor(subj_pos, device=device)
    arange_rows = torch.arange(len(rows), device=device)
    t_rows = torch.tensor(tgt_rows, device=device)
    t_pos = torch.tensor(tgt_pos, device=device)
    t_ids = torch.tensor(tgt_ids, device=device)
    t_owner = torch.tensor(tgt_owner, device=device)
    t_weight = torch.tensor(tgt_weight, device=device)
    e_rows = torch.arange(ess_first, len(rows), device=device)
    e_pos = torch.tensor(ess_last_pos, device=device)
    all_rows = torch.cat([t_rows, e_rows])
    all_pos = torch.cat([t_pos, e_pos])

    # delta = z * |init| / sqrt(d): Adam's step (~lr per coordinate of z) then moves delta by about
    # lr x |init| whatever the model's activation scale, so one lr fits GPT-2 XL and FactGPT.
    init_norm = init.to(device)[first].norm(dim=-1).clamp_min(1e-6)  # per group
    unit = (init_norm / math.sqrt(init.shape[-1]))[:, None]
    z = torch.zeros((n_groups, init.shape[-1]), device=device, requires_grad=True)
    max_norm = config.clamp_norm_factor * init_norm
    row_group = group_t[owner_t]

    def add_delta(act: torch.Tensor) -> torch.Tensor:
        delta = z * unit
        return act.index_put((arange_rows, subj_t), delta[row_group].to(act.dtype), accumulate=True)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        with edit(handle, {site: add_delta}):
            logits = _logits_at(model, ids, mask, all_rows, all_pos).float()
        logp = torch.log_softmax(logits, dim=-1)
        tgt_lp = logp[: len(tgt_rows)].gather(-1, t_ids[:, None]).squeeze(-1)
        nll = torch.zeros(n, device=device).index_add(0, t_owner, -tgt_lp * t_weight)
        return nll, logp[len(tgt_rows):]

    def per_group(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_groups, device=device, dtype=x.dtype).index_add(0, group_t, x)

    # The first step's forward runs at z = 0: it gives the unedited NLL and the KL reference (the
    # KL term and its gradient are zero there); a loop that stops early has its final NLL from
    # the forward that stopped it. Both save a pass over every context. The blocks below the
    # edited layer run once and replay after (`BlocksReplayed`).
    active = torch.ones(n_groups, dtype=torch.bool, device=device)
    steps_taken = torch.zeros(n_groups, dtype=torch.long)
    opt = torch.optim.Adam([z], lr=config.lr)
    nll0: torch.Tensor | None = None
    nll_final: torch.Tensor | None = None
    with BlocksReplayed(handle, layer) as replay:
        for _step in range(max(config.steps, 1)):
            nll, ess = forward()
            if nll0 is None:
                replay.recorded()
                nll0, ess_ref = nll.detach(), ess.detach()
                if config.steps == 0:
                    nll_final = nll0
                    break
            worst = torch.zeros(n_groups, device=device).scatter_reduce(0, group_t, nll.detach(), "amax",
                                                                        include_self=False)
            active = active & (worst > config.stop_nll)
            if not bool(active.any()):
                nll_final = nll.detach()
                break
            kl = (ess_ref.exp() * (ess_ref - ess)).sum(-1)
            decay = config.weight_decay * (z * unit).pow(2).sum(-1) / init_norm.pow(2)
            loss = ((per_group(nll + config.kl_factor * kl) + decay) * active).sum()
            opt.zero_grad()
            loss.backward()
            keep = z.detach().clone()
            opt.step()
            with torch.no_grad():
                z[~active] = keep[~active]
                norms = (z * unit).norm(dim=-1)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                z.mul_(scale[:, None])
            steps_taken += active.cpu().long()
        if nll_final is None:
            with torch.no_grad():
                nll_final, _ = forward()
    assert nll0 is not None
    delta = (z * unit).detach()[group_t].float().cpu()
    return ValueResult(delta, init.float().cpu(), nll0.tolist(), nll_final.tolist(),
                       steps_taken[group_t.cpu()].tolist())


# --- key statistics ------------------------------------------------------------------------

CorpusSource = str  # "auto" | "world" | "prompts" | "generated" | path to a .txt (one text a line) or .json list


def _read_corpus_file(path: Path) -> list[str]:
    import json

    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WorkbenchError(f"cannot read corpus file {path}: {exc}") from exc
    if path.suffix == ".json":
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise WorkbenchError(f"corpus file {path} is not valid JSON: {exc}") from exc
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise WorkbenchError(f"corpus file {path} must hold a JSON list of strings")
        texts = data
    else:
        texts = [line for line in raw.splitlines() if line.strip()]
    if not texts:
        raise WorkbenchError(f"corpus file {path} holds no text")
    return texts


def _generated_stream(handle: Any, n_texts: int, *, length: int, seed: int, batch: int) -> Iterator[str]:
    """Model samples produced lazily (a statistics cache hit then costs one batch, not all)."""
    made = 0
    part = 0
    while made < n_texts:
        b = min(batch, n_texts - made)
        yield from sample_texts(handle, b, length=length, seed=seed * 1_000_003 + part, batch_size=b)
        made += b
        part += 1


def _fact_prompt_batches(handle: Any, world: Any, *, fact_token: FactToken, n: int, seed: int,
                         batch_size: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """Batches of the world's fact prompts (a seeded sample of `n`, or all) with a sample mask
    on each prompt's `fact_token` position."""
    import random

    prompts = list(world.prompts())
    if n < len(prompts):
        prompts = random.Random(seed).sample(prompts, n)
    device = model_device(handle.model)
    pad = pad_id(handle.tokenizer)
    located = [locate(handle.tokenizer, "{}", world.relation(p.relation_id).templates[p.template_index], p.subject,
                      fact_token) for p in prompts]
    batches = []
    for start in range(0, len(located), batch_size):
        chunk = located[start:start + batch_size]
        ids, mask = pad_batch([c.ids for c in chunk], pad, device)
        sample = torch.zeros_like(mask)
        sample[torch.arange(len(chunk)), torch.tensor([c.subject_last for c in chunk])] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "sample_mask": sample})
    return batches, len(located)


def given_statistics(statistics: Mapping[int, Any] | None, layer: int) -> Any | None:
    """The caller's precomputed key statistics for `layer`, or None to collect them (`key_statistics`)."""
    if statistics is None or layer not in statistics:
        return None
    stats = statistics[layer]
    if getattr(stats, "second_moment", None) is None:
        raise WorkbenchError(f"statistics for layer {layer} are a {type(stats).__name__}; give what key_statistics "
                             "returns (it has .second_moment and .count)")
    return stats


def key_statistics(
    handle: Any,
    layer: int,
    *,
    corpus: CorpusSource = "auto",
    texts: Sequence[str] | None = None,
    n_samples: int = 100_000,
    seed: int = 0,
    batch_size: int = 64,
    generated_length: int = 48,
    cache: bool | str = True,
    progress: bool = False,
    fact_token: FactToken = "subject_last",
) -> Any:
    """Second-moment statistics of the MLP key at `layer` (a `SiteStatistics`, float64, disk-cached).

    `texts` (any list of strings) wins over `corpus`. `corpus`: "world" uses the FactWorld
    corpus of a zoo model (`handle.info["world"]`), every token a sample; "prompts" uses the
    world's fact prompts with one sample each, the key at `fact_token` (the position an edit
    reads: the keys an edit must leave alone are other facts' keys at that same position, and
    keys elsewhere in a text can have another distribution altogether); "generated" samples
    `generated_length`-token texts from the model itself; a path reads a .txt (one text a
    line) or .json list; "auto" means "world" when the handle has one, else "generated".
    `n_samples` counts tokens (for "prompts": prompts, at most all of them).
    """
    from workbench.statistics import collect_statistics

    check_stat_samples(n_samples)

    site = key_site(layer)
    if texts is not None:
        return collect_statistics(handle, site, list(texts), n_samples=n_samples, batch_size=batch_size,
                                  cache=cache, progress=progress)
    world = getattr(handle, "world", None)
    source = corpus
    if source == "prompts":
        if world is None or not hasattr(world, "prompts"):
            raise WorkbenchError(f"corpus 'prompts' needs a zoo model trained on a world ({handle.spec} has none); "
                                 "use corpus='world', 'generated' or a text file")
        batches, n_prompts = _fact_prompt_batches(handle, world, fact_token=fact_token, n=n_samples, seed=seed,
                                                  batch_size=batch_size)
        return collect_statistics(handle, site, batches, n_samples=n_prompts, batch_size=batch_size, cache=cache,
                                  corpus_id=f"factworld-prompts:{world.config}:{fact_token}:{n_prompts}:{seed}",
                                  progress=progress)
    if source == "auto":
        source = "world" if world is not None and hasattr(world, "corpus") else "generated"
    if source == "world":
        if world is None or not hasattr(world, "corpus"):
            raise WorkbenchError(f"corpus 'world' needs a zoo model trained on a world ({handle.spec} has none); "
                                 "use corpus='generated' or a text file")
        n_texts = max(64, math.ceil(n_samples / 4))  # every world text has >= 4 tokens
        data = world.iter_corpus(n_texts, seed=seed)
        return collect_statistics(handle, site, data, n_samples=n_samples, batch_size=batch_size, cache=cache,
                                  corpus_id=f"factworld:{world.config}:{n_texts}:{seed}", progress=progress)
    if source == "generated":
        n_texts = max(8, math.ceil(2 * n_samples / max(1, generated_length)))
        stream = _generated_stream(handle, n_texts, length=generated_length, seed=seed, batch=batch_size)
        return collect_statistics(handle, site, stream, n_samples=n_samples, batch_size=batch_size, cache=cache,
                                  corpus_id=f"generated:len={generated_length}:n={n_texts}:seed={seed}:top_k=5",
                                  progress=progress)
    path = Path(source)
    if not path.is_file():
        raise WorkbenchError(f"corpus {corpus!r} is neither 'auto', 'world', 'generated' nor a readable file")
    return collect_statistics(handle, site, _read_corpus_file(path), n_samples=n_samples, batch_size=batch_size,
                              cache=cache, progress=progress)


_factors: list[tuple[weakref.ref, int, float, float, torch.Tensor | None]] = []
_MAX_FACTORS = 2  # a factor is d x d float64: 134 MB at GPT-2 medium's 4,096 keys


def _regularized(second_moment: torch.Tensor, ridge: float, scale: float, extra: torch.Tensor | None) -> torch.Tensor:
    c = second_moment.double()
    a = scale * c
    if extra is not None:
        a = a + extra.double()
    d = a.shape[0]
    return a + ridge * float(torch.diagonal(c).mean().clamp_min(1e-30)) * scale * torch.eye(d, dtype=a.dtype,
                                                                                          device=a.device)


def _factor(second_moment: torch.Tensor, ridge: float, scale: float) -> torch.Tensor | None:
    """The Cholesky factor of scale * C + ridge (None: not positive definite), kept for the same tensor.

    A run of ROME edits solves against one second moment (the statistics kept in memory): the
    factorization, O(d^3), is done once per tensor and reused while that tensor lives unchanged
    (its identity and version counter are checked, so an in-place change refactors it).
    """
    for ref, version, r, sc, chol in _factors:
        if ref() is second_moment and version == second_moment._version and r == ridge and sc == scale:
            return chol
    chol, info = torch.linalg.cholesky_ex(_regularized(second_moment, ridge, scale, None))
    found = chol if int(info) == 0 else None
    _factors.insert(0, (weakref.ref(second_moment), second_moment._version, ridge, scale, found))
    del _factors[_MAX_FACTORS:]
    return found


def solve_second_moment(second_moment: torch.Tensor, rhs: torch.Tensor, *, ridge: float = 1e-6,
                        extra: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """(scale * C + extra + ridge * mean(diag C) * I)^-1 rhs in float64 (Cholesky, falling back to lstsq).

    Without `extra` (ROME) the factorization of C is reused across calls with the same tensor.
    """
    a = None
    if extra is None:
        chol = _factor(second_moment, ridge, scale)
    else:
        a = _regularized(second_moment, ridge, scale, extra)
        chol, info = torch.linalg.cholesky_ex(a)
        chol = chol if int(info) == 0 else None
    b = rhs.double().to(second_moment.device)
    if chol is not None:
        return torch.cholesky_solve(b if b.ndim == 2 else b[:, None], chol).reshape(b.shape)
    a = _regularized(second_moment, ridge, scale, extra) if a is None else a
    return torch.linalg.lstsq(a, b if b.ndim == 2 else b[:, None]).solution.reshape(b.shape)
