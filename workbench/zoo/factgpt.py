"""FactGPT: a small GPT-2 that has memorized a FactWorld, for editing and tracing studies.

A real `transformers` GPT2LMHeadModel with its own byte-level BPE tokenizer, trained here
in a few CPU minutes until it answers every fact through every paraphrase template. Since
the world is invented, we know exactly what the model should say, which facts share an
object (neighbourhoods), and that nothing was learned from elsewhere. The folder it saves
is plain Hugging Face (safetensors + tokenizer.json), with the world manifest beside it.

The same recipe builds GPT-NeoX and Llama models (`FactGPTConfig.arch`), which the zoo's
held-out variants use (`workbench.zoo.variants`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.models import EDITOR_DEFAULTS_FILE, read_editor_defaults, transformers_progress_bars, wrap_hf_model
from workbench.progress import progress_bar
from workbench.storage import atomic_write_json
from workbench.worlds.factworld import FactWorld, FactWorldConfig

log = logging.getLogger(__name__)

VERSION = 2  # part of the cache folder name: a folder trained by an older recipe is never reused
DEFAULT_SEED = 0
WORLD_FILE = "world.json"
# The editor options measured to work on this model (benchmarks/RESULTS.md, "Knowledge editing"),
# written into every trained folder, where `workbench.models.read_editor_defaults` finds them.
EDITOR_DEFAULTS_SOURCE = Path(__file__).with_name("factgpt_editor_defaults.json")
EOS = "<|endoftext|>"
# FactGPTConfig.arch -> (transformers model_type, causal LM class)
ARCHS: dict[str, tuple[str, type[PreTrainedModel]]] = {
    "gpt2": ("gpt2", GPT2LMHeadModel),
    "neox": ("gpt_neox", GPTNeoXForCausalLM),
    "llama": ("llama", LlamaForCausalLM),
}


@dataclass(frozen=True)
class FactGPTConfig:
    """Sizes and training schedule; the defaults train in about 7 minutes on one CPU core (750 steps)."""

    world: FactWorldConfig = field(default_factory=FactWorldConfig)  # its seed is replaced by train's
    vocab_size: int = 2048  # large enough that words are whole tokens: subjects are two tokens
    # transformers architecture: "gpt2" (GPT2LMHeadModel), "neox" (GPTNeoXForCausalLM: rotary on a
    # quarter of each head, parallel attention and MLP) or "llama" (LlamaForCausalLM: RMSNorm,
    # rotary, SwiGLU MLP). Every one ties its output layer to its token embeddings, as GPT-2 does.
    arch: str = "gpt2"
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int | None = None  # MLP width; None: 4 x d_model, for llama 8/3 x d_model rounded up to 8 (`mlp_width`)
    n_positions: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    batch_size: int = 256
    max_steps: int = 1500  # hard cap; training stops earlier once target_accuracy holds on every prompt
    final_lr_factor: float = 0.1
    prefix_prob: float = 0.25  # share of training batches behind a filler sentence (paraphrase robustness)
    # Share of training rows in which the tokens after the subject may attend to the subject
    # only through its last token (a training-time attention mask; the saved model is a plain
    # GPT-2, used unmasked). With names whose last word is shared (FactWorldConfig.
    # shared_last_words), the answer position can then not rebuild the subject from its words
    # and must read what the subject's last token composed: the lookup moves to the MLP at the
    # subject's last token (layer 0), as ROME found in GPT-2 XL, instead of the answer position.
    subject_bottleneck: float = 0.5
    # Weight of the next-token loss on the other tokens: it makes the model a language model
    # of the world's text, which also memorizes the facts faster than an object-only loss.
    lm_weight: float = 0.25
    check_every: int = 50
    target_accuracy: float = 0.995
    check_from: float = 0.98  # full check once the running batch accuracy (which lags) reaches this
    cpu_threads: int = 1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise WorkbenchError(f"FactGPT arch {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if self.n_layers < 1 or self.d_model < 1 or self.n_heads < 1 or self.d_model % self.n_heads:
            raise WorkbenchError(f"FactGPT n_layers={self.n_layers}, d_model={self.d_model}, n_heads={self.n_heads}; "
                                 "expected positive sizes with d_model a multiple of n_heads")


def mlp_width(config: FactGPTConfig) -> int:
    """The MLP's hidden width: `d_mlp`, else GPT-2's 4 x d_model, or for Llama's three-matrix SwiGLU MLP
    8/3 x d_model rounded up to a multiple of 8 (Llama's rule; about the parameters of a 4 x d_model MLP)."""
    if config.d_mlp is not None:
        return config.d_mlp
    return 8 * -(-config.d_model // 3) if config.arch == "llama" else 4 * config.d_model


def build_model(config: FactGPTConfig, tokenizer: Any, *, seed: int) -> PreTrainedModel:
    """A freshly initialized causal LM of `config.arch` for `tokenizer`; the initialization depends only on `seed`."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    hf_config: Any
    if config.arch == "gpt2":
        hf_config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=config.n_positions, n_embd=config.d_model,
            n_layer=config.n_layers, n_head=config.n_heads, n_inner=config.d_mlp, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **ids,
        )
    elif config.arch == "neox":
        hf_config = GPTNeoXConfig(
            vocab_size=len(tokenizer), max_position_embeddings=config.n_positions, hidden_size=config.d_model,
            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, intermediate_size=mlp_width(config),
            hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=True, **ids,
        )
    else:
        hf_config = LlamaConfig(
            vocab_size=len(tokenizer), max_position_embeddings=config.n_positions, hidden_size=config.d_model,
            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_heads,
            intermediate_size=mlp_width(config), attention_dropout=0.0, tie_word_embeddings=True, **ids,
        )
    with torch.random.fork_rng(devices=[]):  # seeded init without leaving the global RNG changed
        torch.manual_seed(seed)
        return ARCHS[config.arch][1](hf_config)


# ---- tokenizer -----------------------------------------------------------------------


def build_tokenizer(world: FactWorld, *, vocab_size: int = 2048,
                    extra_texts: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the world's text, with every object a single token (" Quenn").

    Objects that the trainer did not make whole (small vocabularies) get extra merges
    appended at the lowest priority, so each object becomes one token while other text
    keeps its tokenization except where it contains the same letter pairs. `extra_texts`
    join the tokenizer's training text.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*world.training_texts(), *extra_texts], trainer=trainer)
    tok = _merge_whole(tok, [world.object_token_text(o) for o in world.objects])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
    )
    return fast


def _merge_whole(tok: Tokenizer, words: Sequence[str]) -> Tokenizer:
    for word in words:
        pieces = tok.encode(word).tokens
        if len(pieces) == 1:
            continue
        data = json.loads(tok.to_str())
        vocab: dict[str, int] = data["model"]["vocab"]
        merges: list[Any] = data["model"]["merges"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merges.append([pieces[0], pieces[1]])
            if merged not in vocab:
                used = [*vocab.values(), *(t["id"] for t in data.get("added_tokens", []))]
                vocab[merged] = max(used) + 1
            pieces = [merged, *pieces[2:]]
        tok = Tokenizer.from_str(json.dumps(data))
        if len(tok.encode(word).tokens) != 1:
            raise RuntimeError(f"could not make {word!r} a single token: {tok.encode(word).tokens}")
    return tok


def object_token_ids(tokenizer: Any, world: FactWorld) -> dict[str, int]:
    """Token id of each object's " Name" token; raises if an object is not a single token."""
    out: dict[str, int] = {}
    for obj in world.objects:
        ids = tokenizer(world.object_token_text(obj), add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise WorkbenchError(f"object {obj!r} is {len(ids)} tokens in this tokenizer; FactGPT needs one")
        out[obj] = ids[0]
    return out


# ---- accuracy ------------------------------------------------------------------------


@torch.no_grad()
def _last_token_argmax(model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, pad_id: int,
                       batch_size: int = 512) -> torch.Tensor:
    """Argmax next token after each (unpadded) sequence; right padding so positions are exact."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            length = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), length), dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            last = torch.tensor([len(s) - 1 for s in chunk], device=device)
            out.append(logits[torch.arange(len(chunk), device=device), last].argmax(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


def fact_accuracy(handle: ModelHandle, world: FactWorld, *, prefixed: bool = False, seed: int = 0) -> float:
    """Top-1 accuracy on the object token over every fact x template prompt of `world`.

    With `prefixed=True` each prompt follows a filler sentence (as CounterFact paraphrase
    prompts do), which tests that the answer does not depend on the prompt's position.
    """
    return prompt_accuracy(handle.model, handle.tokenizer, world, prefixed=prefixed, seed=seed)


def prompt_accuracy(model: torch.nn.Module, tokenizer: Any, world: FactWorld, *, prefixed: bool = False,
                    seed: int = 0) -> float:
    """`fact_accuracy` for a bare model and tokenizer (used while training)."""
    prompts = world.prompts()
    texts = [p.text for p in prompts]
    if prefixed:
        fillers = world.filler(len(texts), seed=seed, sentences=(1, 1))
        texts = [f"{f} {t}" for f, t in zip(fillers, texts)]
    targets = object_token_ids(tokenizer, world)
    seqs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pred = _last_token_argmax(model, seqs, pad_id=tokenizer.pad_token_id)
    gold = torch.tensor([targets[p.target] for p in prompts])
    return float((pred == gold).float().mean())


# ---- training ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Example:
    ids: tuple[int, ...]  # prompt then the object token
    ids_spaced: tuple[int, ...]  # same, tokenized after a space (follows a filler prefix)
    split: int  # index in `ids` just after the subject
    split_spaced: int
    start: int = 0  # index in `ids` of the subject's first token
    start_spaced: int = 0


def _examples(tokenizer: Any, world: FactWorld) -> list[_Example]:
    from workbench.requests import subject_token_span

    targets = object_token_ids(tokenizer, world)
    prompts = world.prompts()
    plain = tokenizer([p.text for p in prompts], add_special_tokens=False)["input_ids"]
    spaced = tokenizer([" " + p.text for p in prompts], add_special_tokens=False)["input_ids"]
    out = []
    for p, a, b in zip(prompts, plain, spaced):
        start, end = subject_token_span(tokenizer, p.text, p.subject)
        start_spaced, end_spaced = subject_token_span(tokenizer, " " + p.text, p.subject)
        out.append(_Example((*a, targets[p.target]), (*b, targets[p.target]), end, end_spaced, start, start_spaced))
    return out


def _batch(examples: Sequence[_Example], order: torch.Tensor, prefixes: list[list[int]] | None,
           gen: torch.Generator, *, pad_id: int, spans: list[tuple[int, int]] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask, and the mask of each row's object token.

    With `prefixes`, every row follows a random filler sentence; batches are either all
    prefixed or all plain so that short prompts are not padded to prefixed lengths. `spans`
    receives each row's subject span (first token, token after the subject).
    """
    rows = order.tolist()
    if prefixes is None:
        seqs = [list(examples[i].ids) for i in rows]
        if spans is not None:
            spans += [(examples[i].start, examples[i].split) for i in rows]
    else:
        which = torch.randint(len(prefixes), (len(order),), generator=gen).tolist()
        seqs = [prefixes[w] + list(examples[i].ids_spaced) for w, i in zip(which, rows)]
        if spans is not None:
            spans += [(len(prefixes[w]) + examples[i].start_spaced, len(prefixes[w]) + examples[i].split_spaced)
                      for w, i in zip(which, rows)]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    obj = torch.zeros_like(ids, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        obj[i, len(s) - 1] = True
    return ids, mask, obj


def _bottleneck_mask(mask: torch.Tensor, spans: Sequence[tuple[int, int]], rows: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D attention mask: causal + padding, and in `rows` the positions after the
    subject do not see the subject's tokens other than its last."""
    b, n = mask.shape
    allowed = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()[None].repeat(b, 1, 1)
    allowed &= mask.bool()[:, None, :]
    for r in rows.tolist():
        start, end = spans[r]
        if end - 1 > start:
            allowed[r, end:, start:end - 1] = False
    out = torch.zeros(b, 1, n, n, dtype=dtype, device=mask.device)
    return out.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def _loss(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, obj: torch.Tensor, *,
          lm_weight: float, attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Object-token cross-entropy (+ `lm_weight` x next-token loss elsewhere); also the object hits.

    With `lm_weight == 0` only the positions before objects go through the output layer.
    """
    base, head = model.base_model, model.get_output_embeddings()
    hidden = base(input_ids=ids, attention_mask=mask if attn_mask is None else attn_mask).last_hidden_state
    rows = torch.arange(ids.shape[0], device=ids.device)
    last = obj.long().argmax(1)
    gold = ids[rows, last]
    obj_logits = head(hidden[rows, last - 1])
    loss = torch.nn.functional.cross_entropy(obj_logits, gold)
    if lm_weight:
        logits = head(hidden[:, :-1])
        labels = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | obj[:, 1:], -100)
        loss = loss + lm_weight * torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    return loss, obj_logits.argmax(-1) == gold


def _lr_factor(step: int, config: FactGPTConfig) -> float:
    """Linear warmup, then linear decay to `final_lr_factor` at `max_steps` (sharpens the last facts)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.max_steps - config.warmup_steps)
    return 1.0 - (1.0 - config.final_lr_factor) * min(1.0, (step - config.warmup_steps) / span)


def train(out_dir: str | os.PathLike[str], *, seed: int = DEFAULT_SEED, device: str | torch.device = "cpu",
          progress: bool = True, config: FactGPTConfig | None = None,
          editor_defaults: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Generate the world for `seed`, train FactGPT on it, save to `out_dir`; return the info dict.

    The folder ships `editor_defaults` as its editor options (None: the options measured on the
    zoo's FactGPT, `factgpt_editor_defaults.json`). On CPU the torch thread count is pinned to `config.cpu_threads` while training (and
    restored after): float sums depend on the thread count, so pinning it keeps the same
    seed giving the same weights, and one thread is also the fastest when cores are shared.
    """
    config = FactGPTConfig() if config is None else config
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(config.cpu_threads)
    try:
        return _train(Path(out_dir), seed=seed, device=device, progress=progress, config=config,
                      editor_defaults=editor_defaults)
    finally:
        torch.set_num_threads(threads)


def _train(out: Path, *, seed: int, device: torch.device, progress: bool, config: FactGPTConfig,
           editor_defaults: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    world = FactWorld.generate(replace(config.world, seed=seed))
    tokenizer = build_tokenizer(world, vocab_size=config.vocab_size)
    pad_id = tokenizer.pad_token_id
    examples = _examples(tokenizer, world)
    prefix_texts = world.filler(512, seed=seed + 1, sentences=(1, 1))
    prefixes = [list(p) for p in tokenizer(prefix_texts, add_special_tokens=False)["input_ids"]]
    longest = max(len(e.ids_spaced) for e in examples) + max(len(p) for p in prefixes)
    if longest > config.n_positions:
        raise WorkbenchError(f"training sequences reach {longest} tokens; raise n_positions (now {config.n_positions})")

    model = build_model(config, tokenizer, seed=seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config))
    gen = torch.Generator().manual_seed(seed)

    order = torch.randperm(len(examples), generator=gen)
    cursor = 0
    recent: list[float] = []
    step = 0
    bar = progress_bar(total=config.max_steps, desc="training factgpt", enabled=progress, unit="step", leave=False)
    try:
        while step < config.max_steps:
            if cursor + config.batch_size > len(order):
                order, cursor = torch.randperm(len(examples), generator=gen), 0
            use_prefix = float(torch.rand((), generator=gen)) < config.prefix_prob
            spans: list[tuple[int, int]] | None = [] if config.subject_bottleneck > 0 else None
            ids, mask, obj = _batch(examples, order[cursor:cursor + config.batch_size],
                                    prefixes if use_prefix else None, gen, pad_id=pad_id, spans=spans)
            cursor += config.batch_size
            attn_mask = None
            if spans is not None:
                masked = (torch.rand(len(spans), generator=gen) < config.subject_bottleneck).nonzero().flatten()
                attn_mask = _bottleneck_mask(mask.to(device), spans, masked, torch.float32)
            loss, hits = _loss(model, ids.to(device), mask.to(device), obj.to(device), lm_weight=config.lm_weight,
                               attn_mask=attn_mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            recent = [*recent[1 - config.check_every:], float(hits.float().mean())]
            if step % config.check_every == 0:
                running = sum(recent) / len(recent)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", batch_acc=f"{running:.3f}")
                log.debug("factgpt step %d loss %.4f batch accuracy %.4f at %.1f s", step, float(loss.detach()), running,
                          time.perf_counter() - start)
                # The full check is a pass over every prompt: run it only when the batches say we may be close.
                if running >= config.check_from:
                    accuracy = prompt_accuracy(model, tokenizer, world)
                    log.debug("factgpt step %d: accuracy on all prompts %.4f", step, accuracy)
                    if accuracy >= config.target_accuracy:
                        break
    finally:
        bar.close()
    model.eval()
    accuracy = prompt_accuracy(model, tokenizer, world)
    prefixed = prompt_accuracy(model, tokenizer, world, prefixed=True, seed=seed + 2)
    train_seconds = round(time.perf_counter() - start, 2)
    if accuracy < 0.99:
        log.warning("factgpt reached only %.4f fact accuracy in %d steps", accuracy, step)

    with transformers_progress_bars(False):  # one shard: training's own bar says enough
        model.cpu().save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = config.n_positions
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out)
    world.save(out / WORLD_FILE)
    if editor_defaults is None:
        shutil.copyfile(EDITOR_DEFAULTS_SOURCE, out / EDITOR_DEFAULTS_FILE)
    else:
        atomic_write_json(out / EDITOR_DEFAULTS_FILE, editor_defaults)
    return {
        "name": "factgpt",
        "accuracy": round(accuracy, 6),
        "prefixed_accuracy": round(prefixed, 6),
        "n_facts": len(world.facts),
        "n_prompts": len(examples),
        "n_subjects": len(world.subjects),
        "n_relations": len(world.relations),
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_layers": config.n_layers,
        "d_model": config.d_model,
        "n_heads": config.n_heads,
        "vocab_size": len(tokenizer),
        "steps": step,
        "train_seconds": train_seconds,
        "cpu_threads": config.cpu_threads if device.type == "cpu" else None,
        "device": str(device),
    }


def _portable_tokenizer_config(out: Path) -> None:
    """Name the generic fast-tokenizer class so transformers 4.x and 5.x AutoTokenizer both load it."""
    path = out / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_json(path, data)


# ---- loading -------------------------------------------------------------------------


def model_type(path: str | os.PathLike[str]) -> str | None:
    """The `model_type` in a folder's config.json (None when there is none or it is unreadable)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(config.get("model_type")) if isinstance(config, dict) and config.get("model_type") else None


def shipped_editor_defaults(path: str | os.PathLike[str], world: FactWorld | None = None) -> dict[str, dict[str, Any]]:
    """The editor options a FactGPT folder ships: its `editor_defaults.json` (an empty table included).

    A folder without the file gets this package's measured table only when it is the zoo's own
    FactGPT (GPT-2 on a catalog world, trained before the file was written); a variant's folder
    gets none, since nothing was measured on it.
    """
    path = Path(path)
    if (path / EDITOR_DEFAULTS_FILE).is_file():
        return read_editor_defaults(path)
    world = FactWorld.load(path / WORLD_FILE) if world is None else world
    if model_type(path) == "gpt2" and not world.config.draw_relations:
        return read_editor_defaults(EDITOR_DEFAULTS_SOURCE)
    return {}


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu", spec: str = "zoo:factgpt") -> ModelHandle:
    """Load a trained FactGPT folder (GPT-2, GPT-NeoX or Llama; safetensors only, never unpickles); the world is in info."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise WorkbenchError(f"{path} holds no model.safetensors; train it with workbench.zoo.ensure_trained('factgpt')")
    kind = model_type(path)
    classes = {t: cls for t, cls in ARCHS.values()}
    if kind not in classes:
        raise WorkbenchError(f"{path / 'config.json'} has model_type {kind!r}; a FactGPT folder holds one of "
                             f"{', '.join(classes)}")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    with transformers_progress_bars(False):  # a few small tensors: a bar would only add noise to logs
        model = classes[kind].from_pretrained(path, use_safetensors=True).to(torch.device(device)).eval()
    # FactGPT's BOS is also its pad id and starts every prompt, so transformers would warn on
    # each unmasked forward that it cannot tell padding apart. None of these architectures derives
    # a mask from the pad id (padded batches here pass attention masks), so the runtime config drops it.
    model.config.pad_token_id = None
    handle = wrap_hf_model(model, tokenizer, spec=spec, path=path, kind="causal_lm")
    world = FactWorld.load(path / WORLD_FILE)
    handle.info["world"] = world
    handle.info["editor_defaults"] = shipped_editor_defaults(path, world)
    return handle
