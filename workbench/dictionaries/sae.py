"""The sparse dictionary itself: ReLU, TopK and JumpReLU SAEs and a ReLU transcoder, in SAELens's format.

A dictionary maps a site's activation vector x (d_in) to latents f (d_sae) and back:

    pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    f   = relu(pre)                        relu ("standard" in SAELens), transcoder
        = relu(pre) * (pre > threshold)    jumprelu
        = relu(top_k(pre))                 topk (pre scaled by |W_dec| rows first when
                                           rescale_acts_by_decoder_norm)
    x^  = f @ W_dec + b_dec                (a transcoder's W_dec/b_dec write d_out, another site)

which is SAELens 6's inference arithmetic, so a folder holds exactly what SAELens reads and
writes: `cfg.json` (its field names: `architecture`, `d_in`, `d_sae`, `dtype`, `device`,
`apply_b_dec_to_input`, `normalize_activations`, `reshape_activations`, `k`,
`rescale_acts_by_decoder_norm`, `d_out`, `metadata.hook_name`, `metadata.model_name`, ...)
and `sae_weights.safetensors` (`W_enc` (d_in, d_sae), `b_enc`, `W_dec` (d_sae, d_out),
`b_dec`, and `threshold` for JumpReLU; nothing else, since SAELens loads strictly). What the
workbench adds lives under `metadata.workbench` (model fingerprint, site, training config,
quality) and a checksum in the safetensors header, both of which SAELens ignores. Loading
never unpickles; SAELens's older spellings (`hook_point`, `log_threshold`, pre-6.0 TopK
configs) are read too.

A conv site's activation (N, C, H, W) is a batch of C-vectors, one per position; a token
site's (N, T, D) one D-vector per token: `site_rows`/`from_rows` convert, and
`reconstruct_site` applies the dictionary in the site's own layout (for splicing).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from workbench.errors import CorruptFileError, UnsafeFileError, WorkbenchError
from workbench.storage import atomic_write_json, fill_new_folder, json_safe, looks_like_pickle, save_safetensors_checked

log = logging.getLogger(__name__)

Kind = Literal["relu", "topk", "jumprelu", "transcoder"]
KINDS: tuple[str, ...] = ("relu", "topk", "jumprelu", "transcoder")
ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "transcoder": "transcoder"}
KIND_OF_ARCHITECTURE = {arch: kind for kind, arch in ARCHITECTURE.items()}
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT = "6.0.0"
"""The SAELens config layout these folders follow (6.x: version and hook names under `metadata`)."""
WORKBENCH_CHECKSUM_KEY = "workbench_sha256"
"""The header key of `save_safetensors_checked`'s checksum: files that carry it are verified on loading."""
RUNTIME_NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


@dataclass(frozen=True)
class DictionaryConfig:
    """What a dictionary is: its kind and sizes, and the model site it reads (and, for a transcoder, writes).

    `metadata` is free-form JSON kept under `metadata.workbench` in `cfg.json` (the model
    fingerprint, the resolved site, the training config and quality figures).
    """

    kind: Kind
    d_in: int
    d_sae: int
    d_out: int | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    rescale_acts_by_decoder_norm: bool = False
    hook_name: str = ""
    hook_name_out: str | None = None
    model_name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise WorkbenchError(f"unknown dictionary kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if int(self.d_in) <= 0:
            raise WorkbenchError(f"d_in={self.d_in}: the site's feature dimension must be positive")
        if int(self.d_sae) <= 0:
            raise WorkbenchError(f"width={self.d_sae}: the number of latents must be positive")
        if self.kind == "topk":
            if self.k is None or not 1 <= int(self.k) <= int(self.d_sae):
                raise WorkbenchError(f"k={self.k} with width={self.d_sae}: a TopK dictionary needs 1 <= k <= width")
        elif self.k is not None:
            raise WorkbenchError(f"k={self.k} is a TopK setting; a {self.kind} dictionary has none (leave k unset)")
        if self.kind == "transcoder":
            if self.apply_b_dec_to_input:
                raise WorkbenchError("a transcoder's b_dec lives in its output space; apply_b_dec_to_input must be False")
        elif self.d_out is not None and self.d_out != self.d_in:
            raise WorkbenchError(f"d_out={self.d_out} differs from d_in={self.d_in}; only a transcoder writes another size")
        if self.normalize_activations not in RUNTIME_NORMALIZATIONS:
            raise WorkbenchError(f"normalize_activations={self.normalize_activations!r} is not supported at inference; "
                                 f"expected one of {', '.join(RUNTIME_NORMALIZATIONS)} (fold the rest into the weights)")

    @property
    def output_dim(self) -> int:
        return int(self.d_out if self.d_out is not None else self.d_in)

    @property
    def architecture(self) -> str:
        return ARCHITECTURE[self.kind]

    def to_saelens(self) -> dict[str, Any]:
        """`cfg.json` as SAELens 6 writes it for this architecture."""
        meta: dict[str, Any] = {"sae_lens_version": SAELENS_FORMAT, "model_name": self.model_name,
                                "hook_name": self.hook_name, "hook_head_index": None}
        if self.hook_name_out is not None:
            meta["hook_name_out"] = self.hook_name_out
        if self.metadata:
            meta["workbench"] = json_safe(self.metadata)
        cfg: dict[str, Any] = {
            "architecture": self.architecture, "d_in": int(self.d_in), "d_sae": int(self.d_sae), "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": bool(self.apply_b_dec_to_input),
            "normalize_activations": self.normalize_activations, "reshape_activations": "none", "metadata": meta,
        }
        if self.kind == "topk":
            cfg["k"] = int(self.k)  # type: ignore[arg-type]
            cfg["rescale_acts_by_decoder_norm"] = bool(self.rescale_acts_by_decoder_norm)
        if self.kind == "transcoder":
            cfg["d_out"] = self.output_dim
        return cfg

    @staticmethod
    def from_saelens(cfg: Mapping[str, Any], *, where: str = CFG_FILE) -> DictionaryConfig:
        """Read a SAELens `cfg.json` (6.x, or the pre-6.0 spellings SAELens itself still reads)."""
        if not isinstance(cfg, Mapping):
            raise CorruptFileError(f"{where} is not a JSON object; expected a SAELens cfg.json")
        meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), Mapping) else {}
        arch = cfg.get("architecture")
        k = cfg.get("k")
        if arch is None:  # pre-6.0: an activation_fn, maybe TopK with its k in activation_fn_kwargs
            fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
            kwargs = cfg.get("activation_fn_kwargs") or {}
            arch = "topk" if fn == "topk" and kwargs.get("k") is not None else "standard"
            k = kwargs.get("k", k) if arch == "topk" else None
        if arch not in KIND_OF_ARCHITECTURE:
            raise WorkbenchError(f"{where}: SAELens architecture {arch!r} is not supported here; supported: "
                                 f"{', '.join(sorted(KIND_OF_ARCHITECTURE))}")
        try:
            d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(f"{where} lacks integer d_in and d_sae; expected a SAELens cfg.json") from None
        kind = KIND_OF_ARCHITECTURE[arch]
        norm = cfg.get("normalize_activations", "none")
        if isinstance(norm, bool) or norm is None:
            norm = "expected_average_only_in" if norm else "none"
        hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point") or ""
        return DictionaryConfig(
            kind=kind, d_in=d_in, d_sae=d_sae,
            d_out=int(cfg.get("d_out", d_in)) if kind == "transcoder" else None,
            k=int(k) if kind == "topk" and k is not None else None,
            apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", kind != "transcoder")),
            normalize_activations=str(norm),
            rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
            hook_name=str(hook), hook_name_out=meta.get("hook_name_out") or cfg.get("hook_name_out"),
            model_name=str(meta.get("model_name") or cfg.get("model_name") or ""),
            metadata=dict(meta.get("workbench") or {}),
        )


class _Step(torch.autograd.Function):
    """Heaviside step (pre > threshold) with the rectangle-kernel pseudo-derivative of Rajamanoharan et al.
    2024 flowing to the threshold only (SAELens's default JumpReLU estimator)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        kernel = ((pre - threshold).abs() < bw / 2).to(pre.dtype)
        return None, (-(threshold / bw) * kernel * grad).reshape(-1, pre.shape[-1]).sum(0), None


class _JumpReLU(torch.autograd.Function):
    """relu(pre) * (pre > threshold): the straight gradient to `pre`, the rectangle-kernel one to the threshold."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre.relu() * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        kernel = ((pre - threshold).abs() < bw / 2).to(pre.dtype)
        grad_threshold = (-(threshold / bw) * kernel * grad).reshape(-1, pre.shape[-1]).sum(0)
        return ((pre > threshold) & (pre > 0)).to(pre.dtype) * grad, grad_threshold, None


def jumprelu_step(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """(pre > threshold) as a float, differentiable in the threshold (for the L0 penalty)."""
    return _Step.apply(pre, threshold, bandwidth)  # type: ignore[no-any-return]


class SparseDictionary(nn.Module):
    """A sparse autoencoder (or transcoder) over one site: `encode`, `decode`, `forward` = reconstruction.

    Parameters are SAELens's (`W_enc`, `b_enc`, `W_dec`, `b_dec`, `threshold`), float32. A new
    dictionary is initialized from `seed` alone (decoder rows of norm `init_norm`, encoder the
    decoder's transpose, as SAELens and Anthropic's 2024 update do), so the same seed gives the
    same dictionary.
    """

    def __init__(self, config: DictionaryConfig, *, seed: int = 0, init_norm: float | None = 0.1,
                 jumprelu_init_threshold: float = 0.01, jumprelu_bandwidth: float = 0.05) -> None:
        super().__init__()
        self.config = config
        self.bandwidth = float(jumprelu_bandwidth)
        d_in, d_sae, d_out = int(config.d_in), int(config.d_sae), config.output_dim
        g = torch.Generator().manual_seed(int(seed))
        bound = math.sqrt(6.0 / d_out)  # kaiming-uniform over the decoder's rows, as SAELens
        w_dec = (torch.rand(d_sae, d_out, generator=g) * 2 - 1) * bound
        if init_norm is not None:
            w_dec = w_dec / w_dec.norm(dim=1, keepdim=True).clamp(min=1e-12) * init_norm
        if config.kind == "transcoder":
            w_enc = (torch.rand(d_in, d_sae, generator=g) * 2 - 1) * math.sqrt(6.0 / d_sae)
        else:
            w_enc = w_dec.T.clone()
        self.W_enc = nn.Parameter(w_enc.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(w_dec.contiguous())
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if config.kind == "jumprelu":
            self.threshold = nn.Parameter(torch.full((d_sae,), float(jumprelu_init_threshold)))

    # ---------------------------------------------------------------- arithmetic
    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def d_sae(self) -> int:
        return int(self.config.d_sae)

    @property
    def site(self) -> str:
        return self.config.hook_name

    def _normalize(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        mode = self.config.normalize_activations
        if mode == "constant_norm_rescale":
            coeff = math.sqrt(self.config.d_in) / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            return x * coeff, ("scale", coeff)
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            centered = x - mu
            std = centered.std(dim=-1, keepdim=True)
            return centered / (std + 1e-5), ("ln", mu, std)
        return x, None

    @staticmethod
    def _denormalize(y: torch.Tensor, undo: Any) -> torch.Tensor:
        if undo is None:
            return y
        if undo[0] == "scale":
            return y / undo[1]
        return y * undo[2] + undo[1]

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations (..., d_sae) of activations x (..., d_in)."""
        return self._pre(self._normalize(x.to(self.W_enc.dtype))[0])

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.kind == "topk" and self.config.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Latent activations from pre-activations (the architecture's nonlinearity)."""
        if self.kind == "topk":
            k = int(self.config.k)  # type: ignore[arg-type]
            values, index = torch.topk(pre, k=k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, index, values.relu())
        if self.kind == "jumprelu":
            return _JumpReLU.apply(pre, self.threshold.to(pre.dtype), self.bandwidth)  # type: ignore[no-any-return]
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations (..., d_sae) of site activations x (..., d_in)."""
        return self.activate(self.pre_activations(x))

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """The reconstruction (..., d_out) from latent activations (before any run-time normalization is undone)."""
        if self.kind == "topk" and self.config.rescale_acts_by_decoder_norm:
            acts = acts / self.W_dec.norm(dim=-1)
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of x (a transcoder: its prediction of the output site)."""
        xn, undo = self._normalize(x.to(self.W_enc.dtype))
        return self._denormalize(self.decode(self.activate(self._pre(xn))), undo)

    def reconstruct_site(self, act: torch.Tensor) -> torch.Tensor:
        """`forward` applied to a site activation in its own layout ((N, C, H, W) channels, or (..., D))."""
        rows, shape = site_rows(act)
        out = self(rows.to(self.W_enc.dtype))
        return from_rows(out, shape).to(act.dtype)

    def encode_site(self, act: torch.Tensor) -> torch.Tensor:
        """Latent activations in the site's layout: (N, d_sae, H, W) for a conv site, (..., d_sae) otherwise."""
        rows, shape = site_rows(act)
        return from_rows(self.encode(rows.to(self.W_enc.dtype)), shape)

    @torch.no_grad()
    def decoder_directions(self) -> torch.Tensor:
        """Unit-norm decoder rows (d_sae, d_out): each latent's direction in the (output) site's space."""
        return self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp(min=1e-12)

    # ---------------------------------------------------------------- files
    def weights(self) -> dict[str, torch.Tensor]:
        """The tensors of `sae_weights.safetensors` (SAELens's names, nothing more)."""
        out = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.kind == "jumprelu":
            out["threshold"] = self.threshold
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def write(self, folder: str | os.PathLike[str]) -> Path:
        """Write `cfg.json` and `sae_weights.safetensors` into an existing folder (each file atomically)."""
        folder = Path(folder)
        save_safetensors_checked(folder / WEIGHTS_FILE, self.weights(), {"format": "workbench.sae", "cfg": self.config.to_saelens()})
        atomic_write_json(folder / CFG_FILE, self.config.to_saelens())
        return folder

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save to a new folder `path` (never over an existing one; nothing is left there if writing fails)."""
        path = Path(path)
        fill_new_folder(path, self.write)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> SparseDictionary:
        """Open a dictionary folder written here or by SAELens (`save_model` or `save_inference_model`)."""
        folder = Path(path)
        if not folder.is_dir():
            raise WorkbenchError(f"{folder} is not a folder; a dictionary folder holds {CFG_FILE} and {WEIGHTS_FILE}")
        cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
        for f in (cfg_path, weights_path):
            if not f.is_file():
                raise WorkbenchError(f"{f} is missing; a dictionary folder holds {CFG_FILE} and {WEIGHTS_FILE}")
        try:
            cfg = json.loads(cfg_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFileError(f"{cfg_path} is not valid JSON ({exc})") from None
        config = DictionaryConfig.from_saelens(cfg, where=str(cfg_path))
        tensors = read_weights(weights_path)
        if "log_threshold" in tensors and "threshold" not in tensors:
            tensors["threshold"] = torch.exp(tensors.pop("log_threshold"))
        for name in ("scaling_factor", "finetuning_scaling_factor"):
            if name in tensors:
                if not torch.allclose(tensors[name].float(), torch.ones_like(tensors[name].float())):
                    raise WorkbenchError(f"{weights_path} carries a fine-tuning {name} other than 1, which is not supported here")
                tensors.pop(name)
        expected = {"W_enc": (config.d_in, config.d_sae), "b_enc": (config.d_sae,),
                    "W_dec": (config.d_sae, config.output_dim), "b_dec": (config.output_dim,)}
        if config.kind == "jumprelu":
            expected["threshold"] = (config.d_sae,)
        missing = [n for n in expected if n not in tensors]
        if missing:
            raise CorruptFileError(f"{weights_path} lacks {', '.join(missing)} for a {config.architecture} SAE")
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise WorkbenchError(f"{weights_path} holds {', '.join(extra)}, which a {config.architecture} SAE does not have")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != tuple(int(s) for s in shape):
                raise CorruptFileError(f"{weights_path}: {name} has shape {tuple(tensors[name].shape)}, cfg.json implies {shape}")
        out = cls(config, init_norm=None)
        with torch.no_grad():
            for name in expected:
                getattr(out, name).copy_(tensors[name].float())
        return out.to(device).eval()

    def with_config(self, **changes: Any) -> SparseDictionary:
        """A copy with config fields changed (weights shared by value)."""
        out = type(self)(replace(self.config, **changes), init_norm=None, jumprelu_init_threshold=0.0,
                         jumprelu_bandwidth=self.bandwidth)
        out.load_state_dict(self.state_dict())
        return out


def read_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checksum-verified when the workbench wrote it; never unpickles."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from workbench.storage import load_safetensors_checked

    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"{path} does not exist")
    if looks_like_pickle(path):
        raise UnsafeFileError(f"{path} is a pickle/torch.save file; the workbench never unpickles files")
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        head = fh.read(n) if 0 < n < (1 << 26) else b""
    try:
        meta = json.loads(head.decode("utf-8")).get("__metadata__") or {}
    except (UnicodeDecodeError, ValueError, AttributeError):
        meta = {}
    checked = isinstance(meta, dict) and WORKBENCH_CHECKSUM_KEY in meta
    if checked:
        tensors, _ = load_safetensors_checked(path, what="dictionary weights")
        return dict(tensors)
    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptFileError(f"{path} is not a readable safetensors file ({exc})") from None


# --------------------------------------------------------------------------------------
# Site layouts
# --------------------------------------------------------------------------------------


def site_rows(act: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(rows, original shape): a conv activation (N, C, H, W) as (N*H*W, C) rows, anything else as (-1, D)."""
    shape = tuple(act.shape)
    if act.ndim == 4:
        return act.permute(0, 2, 3, 1).reshape(-1, shape[1]), shape
    return act.reshape(-1, shape[-1]), shape


def from_rows(rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `site_rows` (the feature size may differ: latents, or a transcoder's output)."""
    width = rows.shape[-1]
    if len(shape) == 4:
        n, _, h, w = shape
        return rows.reshape(n, h, w, width).permute(0, 3, 1, 2)
    return rows.reshape(*shape[:-1], width)


def feature_dim(act: torch.Tensor) -> int:
    """The size of a site activation's feature axis (channels of a conv map, else the last axis)."""
    return int(act.shape[1] if act.ndim == 4 else act.shape[-1])


__all__ = ["ARCHITECTURE", "CFG_FILE", "DictionaryConfig", "KINDS", "Kind", "SAELENS_FORMAT", "SparseDictionary", "load_dictionary",
           "WEIGHTS_FILE", "feature_dim", "from_rows", "jumprelu_step", "read_weights", "site_rows"]


def load_dictionary(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> SparseDictionary:
    """`SparseDictionary.load`: a folder written here or by SAELens."""
    return SparseDictionary.load(path, device=device)
