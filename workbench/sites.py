"""Activation sites: canonical TransformerLens-style names mapped, as data, to module paths.

A site is a module plus a side: its output (forward hook) or its input (forward pre-hook).
Each supported family has a `SiteMap` that says, per canonical name, which module and side
carry that activation, and which parameters play the weight roles editors need (MLP in and
out, attention out, embedding, unembedding) with their memory layout. Adding a family is
adding a `SiteMap` to `SITE_MAPS`, not writing code. Any `named_modules()` name is a site
too (output side; `NAME:input` for the input side), which is how CNNs are addressed.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from workbench.errors import UnknownSiteError, WorkbenchError

if TYPE_CHECKING:
    from workbench.handle import ModelHandle

Side = Literal["input", "output"]
Layout = Literal["out_in", "in_out"]

_SAMPLE = 12  # how many names an error message shows before summarising


@dataclass(frozen=True)
class Site:
    """One resolved activation: which module, which side of it, and its layer (if any)."""

    name: str
    module_path: str
    side: Side
    layer: int | None = None
    canonical: bool = False


@dataclass(frozen=True)
class WeightRole:
    """A parameter name template and its layout.

    `out_in` is `nn.Linear` (weight shape `(d_out, d_in)`, y = x W^T); `in_out` is GPT-2's
    `Conv1D` (weight shape `(d_in, d_out)`, y = x W). Editors read the layout instead of
    guessing from shapes, which fails when d_in == d_out.
    """

    param: str
    layout: Layout = "out_in"


@dataclass(frozen=True, repr=False)
class SiteMap:
    """Where canonical sites and weight roles live in one family of Hugging Face models.

    Paths are written as in the family's LM-head model (`transformer.h.{L}.mlp`). When the
    loaded module is the bare base model (e.g. `BertModel`), `base_prefix` is stripped;
    paths outside the base (`lm_head`) then do not exist and are skipped.
    `conditions` keeps a site only when a config attribute has a given value (GPT-NeoX has
    no mid-layer residual when attention and MLP run in parallel).
    """

    family: str
    base_prefix: str
    layers: str  # the ModuleList of blocks
    sites: dict[str, tuple[str, Side]]
    weights: dict[str, WeightRole]
    conditions: dict[str, tuple[str, Any]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"SiteMap(family={self.family!r}, sites={len(self.sites)}, weight_roles={sorted(self.weights)})"

    # -- path helpers -----------------------------------------------------------------
    def _strip(self, model: nn.Module) -> bool:
        """True when `model` is the bare base model (paths lose `base_prefix.`)."""
        names = _module_names(model)
        if self.layers in names:
            return False
        short = self._strip_path(self.layers)
        if short is not None and short in names:
            return True
        raise WorkbenchError(
            f"model of type {type(model).__name__} says it is family {self.family!r} but has no "
            f"{self.layers!r} module; its site map does not fit (module sites still work)"
        )

    def _strip_path(self, path: str) -> str | None:
        prefix = self.base_prefix + "."
        return path[len(prefix):] if path.startswith(prefix) else None

    def _path(self, template: str, layer: int | None, strip: bool) -> str | None:
        path = template.format(L=layer) if "{L}" in template else template
        return self._strip_path(path) if strip else path

    def n_layers(self, model: nn.Module) -> int:
        path = self._path(self.layers, None, self._strip(model))
        return len(model.get_submodule(path))  # type: ignore[arg-type]

    def active_sites(self, model: nn.Module) -> dict[str, tuple[str, Side]]:
        """The canonical templates that apply to this model (conditions checked)."""
        config = getattr(model, "config", None)
        out = {}
        for name, target in self.sites.items():
            cond = self.conditions.get(name)
            if cond is not None and getattr(config, cond[0], None) != cond[1]:
                continue
            out[name] = target
        return out

    def module_path(self, model: nn.Module, template: str, layer: int | None) -> str | None:
        """The concrete module path of a site template, or None when absent in this model."""
        return self._path(template, layer, self._strip(model))

    # -- weight roles -------------------------------------------------------------------
    def weight_name(self, model: nn.Module, role: str, layer: int | None = None) -> str:
        """The concrete parameter name of a weight role (`mlp_out`, layer 3 -> name)."""
        if role not in self.weights:
            raise WorkbenchError(f"family {self.family!r} has no weight role {role!r}; roles: {', '.join(sorted(self.weights))}")
        template = self.weights[role].param
        if "{L}" in template:
            n = self.n_layers(model)
            if layer is None or not 0 <= layer < n:
                raise WorkbenchError(f"weight role {role!r} needs a layer in 0..{n - 1}; got {layer!r}")
        path = self._path(template, layer, self._strip(model))
        if path is None:
            raise WorkbenchError(
                f"weight role {role!r} ({template}) lives outside the base model; this "
                f"{type(model).__name__} has no such parameter"
            )
        return path

    def weight(self, model: nn.Module, role: str, layer: int | None = None) -> tuple[nn.Parameter, Layout]:
        """The parameter for a role and its layout (`out_in` or `in_out`)."""
        name = self.weight_name(model, role, layer)
        params = dict(model.named_parameters(remove_duplicate=False))
        if name not in params:
            raise WorkbenchError(f"weight role {role!r} maps to {name!r}, which {type(model).__name__} does not have")
        return params[name], self.weights[role].layout


def as_out_in(weight: torch.Tensor, layout: Layout) -> torch.Tensor:
    """View a weight as `(d_out, d_in)` whatever its storage layout."""
    return weight if layout == "out_in" else weight.t()


_GPT2 = SiteMap(
    family="gpt2",
    base_prefix="transformer",
    layers="transformer.h",
    sites={
        "hook_embed": ("transformer.wte", "output"),
        "hook_pos_embed": ("transformer.wpe", "output"),
        "blocks.{L}.hook_resid_pre": ("transformer.h.{L}", "input"),
        "blocks.{L}.hook_resid_mid": ("transformer.h.{L}.ln_2", "input"),
        "blocks.{L}.hook_resid_post": ("transformer.h.{L}", "output"),
        "blocks.{L}.attn.hook_out": ("transformer.h.{L}.attn", "output"),
        "blocks.{L}.mlp.hook_pre": ("transformer.h.{L}.mlp.act", "input"),
        "blocks.{L}.mlp.hook_post": ("transformer.h.{L}.mlp.c_proj", "input"),
        "blocks.{L}.mlp.hook_out": ("transformer.h.{L}.mlp", "output"),
        "ln_final.hook_normalized": ("transformer.ln_f", "output"),
    },
    weights={
        "mlp_in": WeightRole("transformer.h.{L}.mlp.c_fc.weight", "in_out"),
        "mlp_out": WeightRole("transformer.h.{L}.mlp.c_proj.weight", "in_out"),
        "attn_out": WeightRole("transformer.h.{L}.attn.c_proj.weight", "in_out"),
        "embedding": WeightRole("transformer.wte.weight", "out_in"),
        "unembedding": WeightRole("lm_head.weight", "out_in"),
    },
)

_GPT_NEOX = SiteMap(
    family="gpt_neox",
    base_prefix="gpt_neox",
    layers="gpt_neox.layers",
    sites={
        "hook_embed": ("gpt_neox.embed_in", "output"),
        "blocks.{L}.hook_resid_pre": ("gpt_neox.layers.{L}", "input"),
        "blocks.{L}.hook_resid_mid": ("gpt_neox.layers.{L}.post_attention_layernorm", "input"),
        "blocks.{L}.hook_resid_post": ("gpt_neox.layers.{L}", "output"),
        "blocks.{L}.attn.hook_out": ("gpt_neox.layers.{L}.attention", "output"),
        "blocks.{L}.mlp.hook_pre": ("gpt_neox.layers.{L}.mlp.act", "input"),
        "blocks.{L}.mlp.hook_post": ("gpt_neox.layers.{L}.mlp.dense_4h_to_h", "input"),
        "blocks.{L}.mlp.hook_out": ("gpt_neox.layers.{L}.mlp", "output"),
        "ln_final.hook_normalized": ("gpt_neox.final_layer_norm", "output"),
    },
    weights={
        "mlp_in": WeightRole("gpt_neox.layers.{L}.mlp.dense_h_to_4h.weight"),
        "mlp_out": WeightRole("gpt_neox.layers.{L}.mlp.dense_4h_to_h.weight"),
        "attn_out": WeightRole("gpt_neox.layers.{L}.attention.dense.weight"),
        "embedding": WeightRole("gpt_neox.embed_in.weight"),
        "unembedding": WeightRole("lm_head.weight"),
    },
    # With parallel residual (the default) the post-attention norm reads resid_pre, so
    # there is no mid-layer residual stream.
    conditions={"blocks.{L}.hook_resid_mid": ("use_parallel_residual", False)},
)

_LLAMA = SiteMap(
    family="llama",
    base_prefix="model",
    layers="model.layers",
    sites={
        "hook_embed": ("model.embed_tokens", "output"),
        "blocks.{L}.hook_resid_pre": ("model.layers.{L}", "input"),
        "blocks.{L}.hook_resid_mid": ("model.layers.{L}.post_attention_layernorm", "input"),
        "blocks.{L}.hook_resid_post": ("model.layers.{L}", "output"),
        "blocks.{L}.attn.hook_out": ("model.layers.{L}.self_attn", "output"),
        "blocks.{L}.mlp.hook_pre": ("model.layers.{L}.mlp.act_fn", "input"),  # gate pre-activation
        "blocks.{L}.mlp.hook_post": ("model.layers.{L}.mlp.down_proj", "input"),  # act(gate) * up
        "blocks.{L}.mlp.hook_out": ("model.layers.{L}.mlp", "output"),
        "ln_final.hook_normalized": ("model.norm", "output"),
    },
    weights={
        "mlp_in": WeightRole("model.layers.{L}.mlp.up_proj.weight"),
        "mlp_gate": WeightRole("model.layers.{L}.mlp.gate_proj.weight"),
        "mlp_out": WeightRole("model.layers.{L}.mlp.down_proj.weight"),
        "attn_out": WeightRole("model.layers.{L}.self_attn.o_proj.weight"),
        "embedding": WeightRole("model.embed_tokens.weight"),
        "unembedding": WeightRole("lm_head.weight"),
    },
)

_BERT = SiteMap(
    family="bert",
    base_prefix="bert",
    layers="bert.encoder.layer",
    sites={
        "hook_embed": ("bert.embeddings.word_embeddings", "output"),
        "hook_pos_embed": ("bert.embeddings.position_embeddings", "output"),
        "hook_token_type_embed": ("bert.embeddings.token_type_embeddings", "output"),
        "blocks.{L}.hook_resid_pre": ("bert.encoder.layer.{L}", "input"),
        # post-LN: the residual after attention is the normalized attention-block output
        "blocks.{L}.hook_resid_mid": ("bert.encoder.layer.{L}.intermediate", "input"),
        "blocks.{L}.hook_resid_post": ("bert.encoder.layer.{L}", "output"),
        "blocks.{L}.attn.hook_out": ("bert.encoder.layer.{L}.attention.output.dense", "output"),
        "blocks.{L}.mlp.hook_pre": ("bert.encoder.layer.{L}.intermediate.intermediate_act_fn", "input"),
        "blocks.{L}.mlp.hook_post": ("bert.encoder.layer.{L}.output.dense", "input"),
        "blocks.{L}.mlp.hook_out": ("bert.encoder.layer.{L}.output.dense", "output"),
    },
    weights={
        "mlp_in": WeightRole("bert.encoder.layer.{L}.intermediate.dense.weight"),
        "mlp_out": WeightRole("bert.encoder.layer.{L}.output.dense.weight"),
        "attn_out": WeightRole("bert.encoder.layer.{L}.attention.output.dense.weight"),
        "embedding": WeightRole("bert.embeddings.word_embeddings.weight"),
        "unembedding": WeightRole("cls.predictions.decoder.weight"),
    },
)

# Families whose module layout is Llama's (checked on tiny models in transformers 5.x).
SITE_MAPS: dict[str, SiteMap] = {
    "gpt2": _GPT2,
    "gpt_neox": _GPT_NEOX,
    "llama": _LLAMA,
    "bert": _BERT,
    **{alias: replace(_LLAMA, family=alias) for alias in ("mistral", "qwen2", "qwen3")},
}


# --- resolution -------------------------------------------------------------------------

def model_and_site_map(target: ModelHandle | nn.Module) -> tuple[nn.Module, SiteMap | None]:
    """The module behind a handle (or the module itself) and its family's SiteMap (None for CNNs)."""
    if isinstance(target, nn.Module):
        return target, site_map_for(target)
    model = getattr(target, "model", None)
    if not isinstance(model, nn.Module):
        raise WorkbenchError(f"expected a ModelHandle or torch.nn.Module, got {type(target).__name__}")
    arch = getattr(target, "arch", None)
    site_map = getattr(arch, "site_map", None)
    return model, site_map if site_map is not None else site_map_for(model)


def require_causal_lm(handle: ModelHandle, purpose: str, *, weight_role: str | None = None) -> SiteMap:
    """The SiteMap of a causal LM with a tokenizer; a clear error, naming what fits, for any other model.

    `purpose` names the method in the message ("ROME", "causal tracing"); `weight_role` also
    requires that role in the map (editors that write `mlp_out` need it).
    """
    from workbench.tokens import has_vocabulary, missing_tokenizer

    causal = ", ".join(sorted(k for k in SITE_MAPS if k != "bert"))
    if handle.kind == "causal_lm" and handle.tokenizer is not None and not has_vocabulary(handle.tokenizer):
        raise WorkbenchError(f"{purpose} needs a tokenizer, and " + missing_tokenizer(handle.spec, handle.path))
    if handle.kind != "causal_lm" or handle.tokenizer is None:
        raise WorkbenchError(f"{purpose} works on causal language models with a tokenizer; {handle.spec!r} is a "
                             f"{handle.kind} model{'' if handle.tokenizer is not None else ' without a tokenizer'} "
                             f"(supported families: {causal})")
    site_map = getattr(handle.arch, "site_map", None) or site_map_for(handle.model)
    if site_map is None or (weight_role is not None and weight_role not in site_map.weights):
        family = getattr(getattr(handle.model, "config", None), "model_type", None) or handle.arch.family
        what = f"the {weight_role} weight of" if weight_role else "the canonical sites of"
        raise WorkbenchError(
            f"{purpose} needs {what} a transformer family, and {family!r} has none. Supported families: {causal}. "
            "To add one, put a workbench.sites.SiteMap for its config.model_type (with its weight roles) into "
            "workbench.sites.SITE_MAPS")
    return site_map


def site_map_for(model: nn.Module) -> SiteMap | None:
    """The SiteMap for a Hugging Face model's `config.model_type`, or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return SITE_MAPS.get(model_type) if isinstance(model_type, str) else None


def _module_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_modules() if name}


def _layer_of(path: str, layers_path: str | None) -> int | None:
    if layers_path is None:
        return None
    prefix = layers_path + "."
    if path.startswith(prefix):
        head = path[len(prefix):].split(".", 1)[0]
        if head.isdigit():
            return int(head)
    return None


def _canonical_sites(model: nn.Module, site_map: SiteMap) -> list[Site]:
    strip = site_map._strip(model)
    n = site_map.n_layers(model)
    names = _module_names(model)
    out: list[Site] = []
    templates = site_map.active_sites(model)
    # Order: embeddings, then block by block, then the final norm.
    for template, (path_t, side) in templates.items():
        if "{L}" not in template and not template.startswith("ln_final"):
            path = site_map._path(path_t, None, strip)
            if path is not None and path in names:
                out.append(Site(template, path, side, None, True))
    for layer in range(n):
        for template, (path_t, side) in templates.items():
            if "{L}" in template:
                path = site_map._path(path_t, layer, strip)
                if path is not None and path in names:
                    out.append(Site(template.format(L=layer), path, side, layer, True))
    for template, (path_t, side) in templates.items():
        if template.startswith("ln_final"):
            path = site_map._path(path_t, None, strip)
            if path is not None and path in names:
                out.append(Site(template, path, side, None, True))
    return out


def list_sites(target: ModelHandle | nn.Module) -> list[Site]:
    """All sites: canonical ones (if the family has a SiteMap), then every module (output side)."""
    model, site_map = model_and_site_map(target)
    sites = _canonical_sites(model, site_map) if site_map is not None else []
    layers_path = site_map.module_path(model, site_map.layers, None) if site_map is not None else None
    for name, _ in model.named_modules():
        if name:
            sites.append(Site(name, name, "output", _layer_of(name, layers_path), False))
    return sites


def resolve_site(target: ModelHandle | nn.Module, name: str | Site) -> Site:
    """Turn a canonical name, a module name, or `MODULE:input` into a `Site`.

    Raises `UnknownSiteError` listing the valid names (canonical ones with their layer
    range, a sample of module names, and the closest matches to what was asked).
    """
    return resolve_sites(target, [name])[0]


def resolve_sites(target: ModelHandle | nn.Module, names: list[str | Site] | tuple[str | Site, ...]) -> list[Site]:
    """`resolve_site` for many names at once (the module tree is walked once)."""
    model, site_map = model_and_site_map(target)
    modules = _module_names(model)
    canonical = {s.name: s for s in _canonical_sites(model, site_map)} if site_map is not None else {}
    layers_path = site_map.module_path(model, site_map.layers, None) if site_map is not None else None
    out = []
    for name in names:
        if isinstance(name, Site):
            if name.module_path not in modules:
                raise UnknownSiteError(
                    f"site {name.name!r} points at module {name.module_path!r}, which this model does not have")
            out.append(name)
            continue
        if not isinstance(name, str) or not name:
            raise UnknownSiteError(f"a site name must be a non-empty string, got {name!r}")
        if name in canonical:
            out.append(canonical[name])
            continue
        module, sep, side = name.rpartition(":")
        if sep and side in ("input", "output") and module in modules:
            out.append(Site(name, module, side, _layer_of(module, layers_path), False))  # type: ignore[arg-type]
        elif name in modules:
            out.append(Site(name, name, "output", _layer_of(name, layers_path), False))
        else:
            raise UnknownSiteError(_unknown_message(model, site_map, name))
    return out


def _unknown_message(model: nn.Module, site_map: SiteMap | None, name: str) -> str:
    modules = [n for n, _ in model.named_modules() if n]
    lines = [f"unknown site {name!r} for {type(model).__name__}."]
    canonical: list[Site] = []
    if site_map is not None:
        canonical = _canonical_sites(model, site_map)
        n = site_map.n_layers(model)
        templates = [t for t in site_map.active_sites(model)
                     if site_map.module_path(model, site_map.sites[t][0], 0 if "{L}" in t else None) in set(modules)]
        lines.append(f"Canonical sites ({site_map.family}, L = 0..{n - 1}): " + ", ".join(templates))
    else:
        family = getattr(getattr(model, "config", None), "model_type", None)
        if _looks_canonical(name):
            lines.append(
                f"Canonical names need a SiteMap; this model ({'family ' + repr(family) if family else 'no Hugging Face config'}) "
                f"has none. Supported families: {', '.join(sorted(SITE_MAPS))}. To add one, put a "
                "workbench.sites.SiteMap for its config.model_type into workbench.sites.SITE_MAPS."
            )
    sample = modules[:_SAMPLE]
    more = f", ... ({len(modules) - len(sample)} more)" if len(modules) > len(sample) else ""
    lines.append(
        f"Module sites: any of the {len(modules)} named_modules() names (output side; append ':input' "
        f"for the input side), e.g. {', '.join(sample)}{more}"
    )
    close = difflib.get_close_matches(name, [s.name for s in canonical] + modules, n=5, cutoff=0.6)
    if close:
        lines.append("Did you mean: " + ", ".join(close) + "?")
    return "\n".join(lines)


_CANONICAL_RE = re.compile(r"^(hook_\w+|blocks\.\d+\..*|ln_final\..*)$")


def _looks_canonical(name: str) -> bool:
    return bool(_CANONICAL_RE.match(name))
