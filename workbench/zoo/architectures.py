"""Real-size architectures with random weights, for timing and memory only.

`zoo:gpt2-small-arch`, `zoo:gpt2-medium-arch`, `zoo:pythia-160m-arch` and `zoo:llama-arch`
are built from the published configurations of GPT-2 small and medium, Pythia-160M and
TinyLlama-1.1B (the Llama 2 architecture), with weights drawn from the seed (`@SEED`,
default 0) the way Hugging Face initializes them. Nothing is downloaded and nothing is
trained: they know no facts, so any quality measured on them is meaningless; they are for
what grows with size (time, memory, statistics throughput). Every handle says so in
`info["random_weights"]` and `info["purpose"]`.

They carry the zoo FactGPT's world and a byte-level BPE tokenizer trained on it (4,096
tokens; the embedding keeps its real vocabulary, the rows beyond the tokenizer are unused),
so the world's prompts, corpus statistics, tracing and editing run on them unchanged. They
are rebuilt on every load (seconds; the same seed gives the same bits) rather than cached:
a cache entry would be hundreds of megabytes of noise.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from typing import Any

import torch

from workbench.devices import resolve_device
from workbench.errors import UnknownModelError, WorkbenchError
from workbench.handle import ModelHandle

log = logging.getLogger(__name__)

VERSION = 1
DEFAULT_SEED = 0
MIN_SEED = 0
TOKENIZER_VOCAB = 4096
PURPOSE = "random weights in a published architecture: for timing and memory only, not for quality"

# Published configurations (Hugging Face config.json fields of the named checkpoints).
CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2-small-arch": ("gpt2", "GPT-2 small (124M)", {
        "n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024, "vocab_size": 50257}),
    "gpt2-medium-arch": ("gpt2", "GPT-2 medium (355M)", {
        "n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024, "vocab_size": 50257}),
    "pythia-160m-arch": ("gpt_neox", "Pythia-160M", {
        "num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
        "max_position_embeddings": 2048, "vocab_size": 50304, "rotary_pct": 0.25, "rotary_emb_base": 10000,
        "use_parallel_residual": True, "tie_word_embeddings": False, "layer_norm_eps": 1e-5}),
    "llama-arch": ("llama", "TinyLlama-1.1B (Llama 2 architecture)", {
        "num_hidden_layers": 22, "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4,
        "intermediate_size": 5632, "max_position_embeddings": 2048, "vocab_size": 32000, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False}),
}


def names() -> list[str]:
    return sorted(CONFIGS)


def is_arch_name(name: str) -> bool:
    return name in CONFIGS


def _check(name: str) -> tuple[str, str, dict[str, Any]]:
    if name not in CONFIGS:
        raise UnknownModelError(f"unknown architecture model {name!r}; expected one of {', '.join(names())}")
    return CONFIGS[name]


def hf_config(name: str) -> Any:
    """The transformers config of an architecture model (special token ids set to the shipped tokenizer's)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    model_type, _title, fields = _check(name)
    cls = {"gpt2": GPT2Config, "gpt_neox": GPTNeoXConfig, "llama": LlamaConfig}[model_type]
    eos = 0  # the shipped tokenizer's only special token
    extra = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if model_type == "gpt2" else {}
    return cls(**fields, **extra, bos_token_id=eos, eos_token_id=eos)


def _model_class(model_type: str) -> Any:
    from transformers import GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM

    return {"gpt2": GPT2LMHeadModel, "gpt_neox": GPTNeoXForCausalLM, "llama": LlamaForCausalLM}[model_type]


def describe(name: str, *, seed: int | None = None) -> dict[str, Any]:
    """What `workbench zoo info NAME` says: parameters and architecture, counted without building any weights."""
    model_type, title, fields = _check(name)
    config = hf_config(name)
    with torch.device("meta"):
        model = _model_class(model_type)(config)
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "name": name,
        "seed": DEFAULT_SEED if seed is None else seed,
        "version": VERSION,
        "architecture": model_type,
        "published_config": title,
        "parameters": parameters,
        "float32_bytes": parameters * 4,
        "config": dict(fields),
        "tokenizer_vocab": TOKENIZER_VOCAB,
        "random_weights": True,
        "purpose": PURPOSE,
        "accuracy": None,
    }


@functools.lru_cache(maxsize=1)
def _world_and_tokenizer() -> tuple[Any, Any]:
    from workbench.worlds.factworld import FactWorld
    from workbench.zoo import factgpt

    world = FactWorld.generate(replace(factgpt.FactGPTConfig().world, seed=factgpt.DEFAULT_SEED))
    return world, factgpt.build_tokenizer(world, vocab_size=TOKENIZER_VOCAB)


def build(name: str, *, seed: int = DEFAULT_SEED) -> torch.nn.Module:
    """The model with weights drawn from `seed` (float32, CPU, eval mode); the global RNG is left as it was."""
    model_type, _title, _fields = _check(name)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < MIN_SEED:
        raise WorkbenchError(f"seed {seed!r} of {name}: expected an integer >= {MIN_SEED}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _model_class(model_type)(hf_config(name)).eval()


def load(name: str, *, seed: int | None = None, device: str | torch.device = "cpu",
         device_map: str | None = None) -> ModelHandle:
    """A handle on the architecture model, on `device` or spread by `device_map="auto"` (needs accelerate)."""
    from workbench.models import wrap_hf_model
    from workbench.zoo import spec_of

    seed = DEFAULT_SEED if seed is None else seed
    dispatch = None if device_map is None else _dispatcher(device_map)  # refuse before building
    model = build(name, seed=seed)
    model = model.to(resolve_device(device)) if dispatch is None else dispatch(model)
    world, tokenizer = _world_and_tokenizer()
    handle = wrap_hf_model(model, tokenizer, spec=spec_of(name, None if seed == DEFAULT_SEED else seed),
                           kind="causal_lm")
    handle.info.update(describe(name, seed=seed))
    handle.info["world"] = world
    handle.info["editor_defaults"] = {}
    return handle


def _dispatcher(device_map: str) -> Any:
    """accelerate's placement over the available devices (device_map='auto'), as a function of the model."""
    if device_map != "auto":
        raise WorkbenchError(f"device_map={device_map!r}; architecture models take device_map='auto' or a --device")
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError:
        raise WorkbenchError("device_map='auto' needs accelerate: pip install 'interp-workbench[big]'") from None

    def dispatch(model: torch.nn.Module) -> torch.nn.Module:
        no_split = getattr(model, "_no_split_modules", None) or []
        placement = infer_auto_device_map(model, no_split_module_classes=list(no_split))
        log.info("device_map='auto' placed %d modules on %s", len(placement), sorted({str(v) for v in placement.values()}))
        return dispatch_model(model, device_map=placement)

    return dispatch
