"""FactGPT: a small GPT-2 that has memorized a FactWorld, for editing and tracing studies.

A real `transformers` GPT2LMHeadModel with its own byte-level BPE tokenizer, trained here
in a few CPU minutes until it answers every fact through every paraphrase template. Since
the world is invented, we know exactly what the model should say, which facts share an
object (neighbourhoods), and that nothing was learned from elsewhere. The folder it saves
is plain Hugging Face (safetensors + tokenizer.json), with the world manifest beside it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.storage import atomic_write_json
from workbench.worlds.factworld import FactWorld, FactWorldConfig

log = logging.getLogger(__name__)

VERSION = 1
DEFAULT_SEED = 0
WORLD_FILE = "world.json"
EOS = "<|endoftext|>"


@dataclass(frozen=True)
class FactGPTConfig:
    """Sizes and training schedule; the defaults train in about 1-3 minutes on 2 CPU cores."""

    world: FactWorldConfig = field(default_factory=FactWorldConfig)  # its seed is replaced by train's
    vocab_size: int = 1024
    n_layers: int = 4
    d_model: int = 192
    n_heads: int = 4
    n_positions: int = 64
    lr: float = 3e-3
    warmup_steps: int = 50
    batch_size: int = 256
    max_steps: int = 4000
    prefix_prob: float = 0.4  # share of training prompts behind a filler sentence (paraphrase robustness)
    lm_weight: float = 0.25  # weight of the plain next-token loss on non-object tokens
    check_every: int = 50
    target_accuracy: float = 0.995


# ---- tokenizer -----------------------------------------------------------------------


def build_tokenizer(world: FactWorld, *, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the world's text, with every object a single token (" Quenn").

    Objects that the trainer did not make whole get extra merges appended (lowest priority),
    so the tokenization of everything else is unchanged and each object becomes one token.
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
    tok.train_from_iterator(world.training_texts(), trainer=trainer)
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
    tokenizer = handle.tokenizer
    prompts = world.prompts()
    texts = [p.text for p in prompts]
    if prefixed:
        fillers = world.filler(len(texts), seed=seed, sentences=(1, 1))
        texts = [f"{f} {t}" for f, t in zip(fillers, texts)]
    targets = object_token_ids(tokenizer, world)
    seqs = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pred = _last_token_argmax(handle.model, seqs, pad_id=tokenizer.pad_token_id)
    gold = torch.tensor([targets[p.target] for p in prompts])
    return float((pred == gold).float().mean())


# ---- training ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Example:
    ids: tuple[int, ...]  # prompt then the object token
    ids_spaced: tuple[int, ...]  # same, tokenized after a space (follows a filler prefix)


def _examples(tokenizer: Any, world: FactWorld) -> list[_Example]:
    targets = object_token_ids(tokenizer, world)
    prompts = world.prompts()
    plain = tokenizer([p.text for p in prompts], add_special_tokens=False)["input_ids"]
    spaced = tokenizer([" " + p.text for p in prompts], add_special_tokens=False)["input_ids"]
    return [_Example((*a, targets[p.target]), (*b, targets[p.target])) for p, a, b in zip(prompts, plain, spaced)]


def _batch(examples: Sequence[_Example], order: torch.Tensor, prefixes: list[list[int]],
           gen: torch.Generator, *, prefix_prob: float, pad_id: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, attention mask, LM labels (-100 = ignore) and the object-token mask."""
    use_prefix = torch.rand(len(order), generator=gen) < prefix_prob
    which = torch.randint(len(prefixes), (len(order),), generator=gen)
    seqs: list[list[int]] = []
    for k, idx in enumerate(order.tolist()):
        ex = examples[idx]
        seqs.append(prefixes[int(which[k])] + list(ex.ids_spaced) if use_prefix[k] else list(ex.ids))
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    obj = torch.zeros_like(ids, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        obj[i, len(s) - 1] = True
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels, obj


def _loss(logits: torch.Tensor, labels: torch.Tensor, obj: torch.Tensor, lm_weight: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Object-token cross-entropy plus `lm_weight` x next-token loss elsewhere; also object hits."""
    logits, labels, obj = logits[:, :-1], labels[:, 1:], obj[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           reduction="none", ignore_index=-100).view_as(labels)
    valid = labels != -100
    other = valid & ~obj
    loss = ce[obj].mean() + lm_weight * ce[other].sum() / other.sum().clamp(min=1)
    hits = logits[obj].argmax(-1) == labels[obj]
    return loss, hits


def train(out_dir: str | os.PathLike[str], *, seed: int = DEFAULT_SEED, device: str | torch.device = "cpu",
          progress: bool = True, config: FactGPTConfig | None = None) -> dict[str, Any]:
    """Generate the world for `seed`, train FactGPT on it, save to `out_dir`; return the info dict."""
    from dataclasses import replace

    config = FactGPTConfig() if config is None else config
    device = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    world = FactWorld.generate(replace(config.world, seed=seed))
    tokenizer = build_tokenizer(world, vocab_size=config.vocab_size)
    pad_id = tokenizer.pad_token_id
    examples = _examples(tokenizer, world)
    prefixes = [list(p) for p in tokenizer(world.filler(512, seed=seed + 1, sentences=(1, 1)),
                                           add_special_tokens=False)["input_ids"]]
    longest = max(len(e.ids_spaced) for e in examples) + max(len(p) for p in prefixes)
    if longest > config.n_positions:
        raise WorkbenchError(f"training sequences reach {longest} tokens; raise n_positions (now {config.n_positions})")

    gpt_config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=config.n_positions, n_embd=config.d_model,
        n_layer=config.n_layers, n_head=config.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init without leaving the global RNG changed
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(gpt_config)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / config.warmup_steps))
    gen = torch.Generator().manual_seed(seed)

    order = torch.randperm(len(examples), generator=gen)
    cursor = 0
    recent: list[float] = []
    accuracy = 0.0
    step = 0
    bar = tqdm(total=config.max_steps, desc="factgpt", disable=not progress, unit="step", leave=False)
    try:
        while step < config.max_steps:
            if cursor + config.batch_size > len(order):
                order, cursor = torch.randperm(len(examples), generator=gen), 0
            ids, mask, labels, obj = _batch(examples, order[cursor:cursor + config.batch_size], prefixes, gen,
                                            prefix_prob=config.prefix_prob, pad_id=pad_id)
            cursor += config.batch_size
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            loss, hits = _loss(logits, labels.to(device), obj.to(device), config.lm_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            recent.append(float(hits.float().mean()))
            recent = recent[-config.check_every:]
            if step % config.check_every == 0:
                running = sum(recent) / len(recent)
                bar.set_postfix(loss=f"{float(loss):.3f}", batch_acc=f"{running:.3f}")
                # The full check costs a pass over every prompt: only when the batches say we may be done.
                if running >= config.target_accuracy:
                    accuracy = _accuracy(model, tokenizer, world)
                    log.info("factgpt step %d: accuracy %.4f", step, accuracy)
                    if accuracy >= config.target_accuracy:
                        break
    finally:
        bar.close()
    model.eval()
    accuracy = _accuracy(model, tokenizer, world)
    prefixed = fact_accuracy(_bare_handle(model, tokenizer, None), world, prefixed=True, seed=seed + 2)
    train_seconds = round(time.perf_counter() - start, 2)
    if accuracy < 0.99:
        log.warning("factgpt reached only %.4f fact accuracy in %d steps", accuracy, step)

    model.cpu().save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = config.n_positions
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out)
    world.save(out / WORLD_FILE)
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
        "vocab_size": len(tokenizer),
        "steps": step,
        "train_seconds": train_seconds,
        "torch_threads": torch.get_num_threads(),
    }


def _accuracy(model: torch.nn.Module, tokenizer: Any, world: FactWorld) -> float:
    return fact_accuracy(_bare_handle(model, tokenizer, None), world)


def _portable_tokenizer_config(out: Path) -> None:
    """Name the generic fast-tokenizer class so transformers 4.x and 5.x AutoTokenizer both load it."""
    path = out / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    atomic_write_json(path, data)


# ---- loading -------------------------------------------------------------------------


def _bare_handle(model: GPT2LMHeadModel, tokenizer: Any, path: Path | None) -> ModelHandle:
    try:
        from workbench.models import wrap_hf_model
    except ImportError:  # TODO: drop once workbench.models (wrap_hf_model) lands; it adds the site map
        from workbench.handle import Architecture

        cfg = model.config
        arch = Architecture(family="gpt2", n_layers=cfg.n_layer, d_model=cfg.n_embd,
                            d_mlp=cfg.n_inner or 4 * cfg.n_embd, n_heads=cfg.n_head, vocab_size=cfg.vocab_size)
        return ModelHandle(spec="zoo:factgpt", model=model, kind="causal_lm", arch=arch, tokenizer=tokenizer, path=path)
    return wrap_hf_model(model, tokenizer, spec="zoo:factgpt", path=path, kind="causal_lm")


def load(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> ModelHandle:
    """Load a trained FactGPT folder (safetensors only; never unpickles); the world is in info."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise WorkbenchError(f"{path} holds no model.safetensors; train it with workbench.zoo.ensure_trained('factgpt')")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model = GPT2LMHeadModel.from_pretrained(path, use_safetensors=True).to(torch.device(device)).eval()
    handle = _bare_handle(model, tokenizer, path)
    handle.info["world"] = FactWorld.load(path / WORLD_FILE)
    return handle
