"""Folding a change of units into weights: the planner behind unit ablation, steering and erasure.

A unit (conv channel, MLP neuron) at a site becomes `factor * a + offset`. The change is
written into parameters, on one of two sides:

- **write side**: the layers that produce the unit. A Linear/Conv output channel scales its
  weight rows and bias; a BatchNorm channel (eval mode) scales gamma and beta, which is how
  a bias-free conv followed by BN is edited (zeroing the conv's weights would leave BN's
  beta). Through a ReLU, `relu(f y) = f relu(y)` for f >= 0 and `relu(offset) = offset` for
  offset >= 0, so a post-ReLU unit is edited at its BN. A residual sum `relu(bn2(...) +
  shortcut(x))` is edited on both branches; an identity shortcut cannot be (x feeds other
  layers too), and that is reported, not approximated.
- **read side**: the layers that consume the unit. Each reading Linear/Conv scales its
  input slice (weight columns); through pooling and flatten this reaches e.g. a classifier
  head. An offset is folded into a reading Linear's bias; a padded conv cannot absorb a
  constant exactly (its border sees zeros), so that is refused.

CNNs are followed through their torch.fx graph. Transformers: `blocks.L.mlp.hook_post` (MLP
neurons) is read by the MLP output projection (columns, any family); `mlp.hook_pre`,
`mlp.hook_out` and `attn.hook_out` are written by a projection (rows and bias). The residual
stream (`hook_resid_*`, embeddings) is read through weightless skip connections and
LayerNorm, so a unit there cannot be folded into weights.

`plan_units` and `plan_gates` add a site's change to a `FoldPlan` (dense per-parameter
changes, built against the current weights and never applied); callers turn
`plan.changes` into a `WeightDelta`. Anything without an exact weight edit raises
`NotFoldableError` saying why.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.sites import Site

Side = Literal["auto", "write", "read"]


class NotFoldableError(WorkbenchError):
    """The requested unit change has no exact weight edit at this site (the message says why)."""


# --------------------------------------------------------------------------------------
# Parameter edits: each is (param name, slice axis, index list, factor, offset per index or None)
# --------------------------------------------------------------------------------------

@dataclass
class FoldPlan:
    """Dense changes accumulated per parameter (built against the current weights)."""

    model: nn.Module
    changes: dict[str, torch.Tensor] = field(default_factory=dict)
    touched: list[str] = field(default_factory=list)

    def _param(self, name: str) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        if name not in params:
            raise NotFoldableError(f"parameter {name!r} does not exist (a module without it cannot absorb this change)")
        return params[name].detach()

    def scale(self, name: str, axis: int, idx: torch.Tensor, factor: float) -> None:
        """Multiply a slice (indices `idx` along `axis`) of a parameter by `factor`."""
        if factor == 1.0:
            return
        p = self._param(name).float()
        change = self.changes.setdefault(name, torch.zeros_like(p))
        sl = [slice(None)] * p.ndim
        sl[axis] = idx.to(p.device)
        change[tuple(sl)] += (factor - 1.0) * p[tuple(sl)]
        self.touched.append(name)

    def add(self, name: str, idx: torch.Tensor | None, value: torch.Tensor) -> None:
        """Add `value` to a parameter (at `idx` of a 1-D parameter, or everywhere when None)."""
        p = self._param(name).float()
        change = self.changes.setdefault(name, torch.zeros_like(p))
        if idx is None:
            change += value.to(change)
        else:
            change[idx.to(p.device)] += value.to(change)
        self.touched.append(name)



def is_conv1d_hf(module: nn.Module) -> bool:
    """Whether `module` is Hugging Face's Conv1D (GPT-2): a Linear whose weight is stored transposed."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _out_axis(module: nn.Module) -> int:
    """Axis of a weight that indexes output units (Linear/Conv: 0; GPT-2 Conv1D: 1)."""
    return 1 if is_conv1d_hf(module) else 0


def _write_module(plan: FoldPlan, path: str, module: nn.Module, idx: torch.Tensor, factor: float, offset: torch.Tensor | None) -> None:
    """Edit a producing layer's output channels: rows (and bias, which takes the offset)."""
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        if module.training:
            raise NotFoldableError(f"{path} is a BatchNorm in training mode; put the model in eval mode")
        if not module.affine:
            raise NotFoldableError(f"{path} is a BatchNorm without affine parameters; there is no gamma/beta to edit")
        plan.scale(f"{path}.weight", 0, idx, factor)
        plan.scale(f"{path}.bias", 0, idx, factor)
        if offset is not None:
            plan.add(f"{path}.bias", idx, offset)
        return
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or is_conv1d_hf(module):
        plan.scale(f"{path}.weight", _out_axis(module), idx, factor)
        if has_bias:
            plan.scale(f"{path}.bias", 0, idx, factor)
        if offset is not None and bool((offset != 0).any()):
            if not has_bias:
                raise NotFoldableError(f"{path} has no bias, so a constant (mean) value cannot be written into its output; "
                                       "use value='zero', or the run-time hook")
            plan.add(f"{path}.bias", idx, offset)
        return
    raise NotFoldableError(f"{path} is a {type(module).__name__}, whose outputs are not set by a weight slice")


def _read_module(plan: FoldPlan, path: str, module: nn.Module, idx: torch.Tensor, factor: float, offset: torch.Tensor | None) -> None:
    """Edit a consuming layer's input slice (weight columns); a Linear's bias absorbs the offset."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            raise NotFoldableError(f"{path} is a grouped convolution; its input channels are not a plain weight slice")
        plan.scale(f"{path}.weight", 1, idx, factor)
        if offset is not None and bool((offset != 0).any()):
            raise NotFoldableError(
                f"{path} is a convolution reading the units; a constant (mean) input cannot be folded into it exactly "
                "(zero padding makes the border see a different sum); edit the writing side, or use value='zero'")
        return
    if isinstance(module, nn.Linear) or is_conv1d_hf(module):
        in_axis = 0 if is_conv1d_hf(module) else 1
        plan.scale(f"{path}.weight", in_axis, idx, factor)
        if offset is not None and bool((offset != 0).any()):
            if getattr(module, "bias", None) is None:
                raise NotFoldableError(f"{path} reads the units but has no bias to absorb their constant value; use value='zero'")
            w = module.weight.detach().float()
            cols = w[idx.to(w.device)] if in_axis == 0 else w[:, idx.to(w.device)].T  # (k, out)
            plan.add(f"{path}.bias", None, offset.to(cols) @ cols)
        return
    raise NotFoldableError(f"{path} is a {type(module).__name__}, not a Linear/Conv that reads the units through a weight slice")


# --------------------------------------------------------------------------------------
# Graph analysis for CNNs (torch.fx)
# --------------------------------------------------------------------------------------

_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)
_RELU_FUNCS = (F.relu, torch.relu)
_ADD_FUNCS = (operator.add, torch.add, operator.iadd)


def _trace(model: nn.Module) -> Any:
    import torch.fx as fx

    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: no graph to fold along
        raise NotFoldableError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}), "
            "so the layers around this site are unknown; give a site that is a Linear/Conv/BatchNorm output or a "
            "Linear/Conv input (NAME:input), or use the run-time hook") from None


def following_batchnorm(model: nn.Module, path: str) -> tuple[str, nn.Module] | None:
    """The BatchNorm (eval mode, affine, running statistics) that alone reads module `path`'s output, or None.

    A per-channel constant added to a bias-free convolution's output is the same as a change of
    that BatchNorm's beta (gamma / sqrt(running_var + eps) times the constant), so it folds there.
    """
    try:
        gm = _trace(model)
    except NotFoldableError:
        return None
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == path), None)
    users = list(node.users) if node is not None else []
    if len(users) != 1:
        return None
    bn = _module(gm, model, users[0])
    if (not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) or bn.training or not bn.affine
            or bn.running_var is None):
        return None
    return str(users[0].target), bn


def _site_node(gm: Any, site: Site) -> Any:
    nodes = list(gm.graph.nodes)
    for n in nodes:
        if n.op == "call_module" and n.target == site.module_path:
            return n
    inside = [n for n in nodes if n.op not in ("placeholder", "output", "get_attr")
              and any(k == site.module_path or k.startswith(site.module_path + ".") for k in _stack(n))]
    if not inside:
        raise NotFoldableError(f"site {site.name} ({site.module_path}) is not called in the traced forward pass")
    return inside[-1]


def _stack(node: Any) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] if isinstance(v, tuple) else str(k) for k, v in stack.items()]


def _module(gm: Any, model: nn.Module, node: Any) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return model.get_submodule(node.target)


def _is_relu(model: nn.Module, gm: Any, node: Any) -> bool:
    mod = _module(gm, model, node)
    return isinstance(mod, nn.ReLU) or (node.op == "call_function" and node.target in _RELU_FUNCS)


def _write_node(plan: FoldPlan, model: nn.Module, gm: Any, node: Any, idx: torch.Tensor, factor: float,
                offset: torch.Tensor | None, *, is_site: bool) -> None:
    if not is_site and len(node.users) != 1:
        raise NotFoldableError(
            f"the value {node.name} on the way back from the site also feeds {', '.join(u.name for u in node.users)}; "
            "editing its producer would change those too (e.g. an identity shortcut); choose side='read' or another site")
    mod = _module(gm, model, node)
    if mod is not None and isinstance(mod, _PASS_MODULES):
        _write_node(plan, model, gm, node.args[0], idx, factor, offset, is_site=False)
        return
    if _is_relu(model, gm, node):
        off_zero = offset is None or not bool((offset != 0).any())
        if factor >= 0 and off_zero:
            _write_node(plan, model, gm, node.args[0], idx, factor, None, is_site=False)
            return
        if factor == 0 and offset is not None and bool((offset >= 0).all()):
            _write_node(plan, model, gm, node.args[0], idx, 0.0, offset, is_site=False)
            return
        raise NotFoldableError(f"{node.name} is a ReLU: only a non-negative scale, or a constant >= 0, passes through it exactly")
    if node.op == "call_function" and node.target in _ADD_FUNCS and len(node.args) == 2:
        a, b = node.args
        _write_node(plan, model, gm, a, idx, factor, offset, is_site=False)
        _write_node(plan, model, gm, b, idx, factor, None, is_site=False)
        return
    if mod is not None:
        path = node.target
        _write_module(plan, path, mod, idx, factor, offset)
        return
    raise NotFoldableError(f"{node.name} ({node.op} {getattr(node.target, '__name__', node.target)}) is not a layer whose outputs "
                           "can be set by editing weights")


def _read_node(plan: FoldPlan, model: nn.Module, gm: Any, node: Any, idx: torch.Tensor, factor: float,
               offset: torch.Tensor | None, shapes: dict[str, tuple[int, ...]]) -> None:
    for user in list(node.users):
        mod = _module(gm, model, user)
        off_zero = offset is None or not bool((offset != 0).any())
        if mod is not None and isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            _read_module(plan, user.target, mod, idx, factor, offset)
        elif mod is not None and isinstance(mod, _PASS_MODULES + (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d)):
            _read_node(plan, model, gm, user, idx, factor, offset, shapes)
        elif (mod is not None and isinstance(mod, (nn.MaxPool2d, nn.MaxPool1d, nn.AdaptiveMaxPool2d, nn.ReLU))) or _is_relu(model, gm, user):
            if factor < 0 or not off_zero:
                raise NotFoldableError(f"{user.name} is a max-pool/ReLU: only a non-negative scale passes through it exactly")
            _read_node(plan, model, gm, user, idx, factor, offset, shapes)
        elif (mod is not None and isinstance(mod, nn.Flatten)) or (user.op == "call_function" and user.target is torch.flatten) \
                or (user.op == "call_method" and user.target in ("flatten", "view", "reshape")):
            shape = shapes.get(node.name)
            if shape is None or len(shape) < 2:
                raise NotFoldableError(f"cannot tell how {user.name} rearranges the units (unknown input shape)")
            per = 1
            for s in shape[2:]:
                per *= int(s)
            new_idx = (idx[:, None] * per + torch.arange(per)[None]).reshape(-1)
            new_off = None if offset is None else offset.repeat_interleave(per)
            _read_node(plan, model, gm, user, new_idx, factor, new_off, shapes)
        else:
            what = user.target if user.op == "call_module" else getattr(user.target, "__name__", user.target)
            raise NotFoldableError(
                f"the units are read by {user.name} ({what}), which is not a Linear/Conv (or pooling/flatten leading to "
                "one); e.g. a residual sum or a normalization. Edit the writing side (side='write') or use the run-time hook")


def _shapes(gm: Any, handle: ModelHandle) -> dict[str, tuple[int, ...]]:
    from torch.fx.passes.shape_prop import ShapeProp

    from workbench.models import dummy_input

    x = dummy_input(handle)
    if not isinstance(x, torch.Tensor):
        return {}
    try:
        ShapeProp(gm).propagate(x)
    except Exception:  # noqa: BLE001 - shapes are a convenience for flatten; without them flatten is refused
        return {}
    out = {}
    for n in gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            out[n.name] = tuple(tm.shape)
    return out


# --------------------------------------------------------------------------------------
# Sites -> plans
# --------------------------------------------------------------------------------------

_ROLE_OF_TEMPLATE = {"mlp.hook_out": "mlp_out", "attn.hook_out": "attn_out", "mlp.hook_pre": "mlp_in"}


def canonical_kind(site: Site) -> str | None:
    """A canonical site's name without its block prefix (`blocks.3.mlp.hook_out` -> `mlp.hook_out`); None otherwise."""
    if not site.canonical:
        return None
    parts = site.name.split(".")
    return ".".join(parts[2:]) if site.name.startswith("blocks.") else site.name


def _residual_message(site: Site) -> str:
    return (f"site {site.name} is the residual stream (or an embedding): it is read through a weightless skip "
            "connection and a LayerNorm, and written by several layers at once, so changing one of its dimensions "
            "cannot be folded exactly into any weight. Use the run-time hook instead: "
            "`with editors.unit_ablation.ablation_hook(handle, site, units): ...`, or pick a site written or read by a "
            "projection: blocks.L.mlp.hook_post (MLP neurons), blocks.L.mlp.hook_pre, blocks.L.mlp.hook_out, blocks.L.attn.hook_out")


def _plan_transformer(plan: FoldPlan, handle: ModelHandle, site: Site, idx: torch.Tensor, factor: float,
                      offset: torch.Tensor | None, side: Side) -> str:
    model = handle.model
    site_map = handle.arch.site_map
    kind = canonical_kind(site)
    module = model.get_submodule(site.module_path)
    direct_linear = isinstance(module, nn.Linear) or is_conv1d_hf(module)
    if site.side == "input" and direct_linear and side in ("auto", "read"):
        _read_module(plan, site.module_path, module, idx, factor, offset)
        return "read"
    if site.side == "output" and (isinstance(module, (nn.Linear, nn.BatchNorm1d)) or is_conv1d_hf(module)):
        if side == "read":
            raise NotFoldableError(f"site {site.name} is the output of {site.module_path}; side='read' is not supported here, use 'write'")
        _write_module(plan, site.module_path, module, idx, factor, offset)
        return "write"
    if kind in _ROLE_OF_TEMPLATE and site_map is not None and site.layer is not None:
        if side == "read":
            raise NotFoldableError(f"site {site.name} is written by a projection; use side='write' (or 'auto')")
        role = _ROLE_OF_TEMPLATE[kind]
        if kind == "mlp.hook_pre" and "mlp_gate" in site_map.weights:
            role = "mlp_gate"
        name = site_map.weight_name(model, role, site.layer)
        path = name.rsplit(".", 1)[0]
        _write_module(plan, path, model.get_submodule(path), idx, factor, offset)
        return "write"
    if kind is not None and ("resid" in kind or kind.startswith("hook_") or kind.startswith("ln_final")):
        raise NotFoldableError(_residual_message(site))
    raise NotFoldableError(
        f"site {site.name} ({site.module_path}, {site.side}) is neither written by nor read by a single projection, "
        "so its units cannot be folded into weights; use blocks.L.mlp.hook_post (neurons), a Linear's output, or NAME:input "
        "of a Linear, or the run-time hook editors.unit_ablation.ablation_hook")


def _plan_graph(plan: FoldPlan, handle: ModelHandle, site: Site, idx: torch.Tensor, factor: float,
                offset: torch.Tensor | None, side: Side) -> str:
    model = handle.model
    module = model.get_submodule(site.module_path)
    if site.side == "input":
        if side == "write":
            raise NotFoldableError(f"site {site.name} is the input of {site.module_path}; use side='read' (or 'auto')")
        _read_module(plan, site.module_path, module, idx, factor, offset)
        return "read"
    gm = _trace(model)
    node = _site_node(gm, site)
    errors = []
    order = ("write", "read") if side == "auto" else (side,)
    for attempt in order:
        trial = FoldPlan(model)
        try:
            if attempt == "write":
                _write_node(trial, model, gm, node, idx, factor, offset, is_site=True)
            else:
                _read_node(trial, model, gm, node, idx, factor, offset, _shapes(gm, handle))
        except NotFoldableError as exc:
            errors.append(f"{attempt} side: {exc}")
            continue
        plan.changes.update(trial.changes)
        plan.touched.extend(trial.touched)
        return attempt
    raise NotFoldableError(f"the units of {site.name} cannot be folded into weights exactly. " + " | ".join(errors)
                           + " | Use the run-time hook editors.unit_ablation.ablation_hook(handle, site, units) instead.")


def plan_units(plan: FoldPlan, handle: ModelHandle, site: Site, idx: torch.Tensor, factor: float,
               offset: torch.Tensor | None, side: Side = "auto") -> str:
    """Add `units idx of site -> factor * a + offset` to `plan`; returns the side used ("write" or "read").

    `side="auto"` tries the write side, then the read side. Raises NotFoldableError when
    neither has an exact weight edit.
    """
    if handle.arch.site_map is not None:
        return _plan_transformer(plan, handle, site, idx, factor, offset, side)
    return _plan_graph(plan, handle, site, idx, factor, offset, side)


def plan_gates(plan: FoldPlan, handle: ModelHandle, site: Site, units: Sequence[int], factors: Sequence[float],
               constants: Sequence[float] | None) -> None:
    """Add unit gates to `plan`: each unit's pre-activation z becomes f*z + (1-f)*c, written by the
    layer(s) in front of the site's ReLU (or of the site itself when it is no ReLU's output).

    One factor per unit; `constants` (one per unit) default to 0. A CNN site's output only.
    """
    model = handle.model
    gm = _trace(model)
    node = _site_node(gm, site)
    through_relu = _is_relu(model, gm, node)
    if through_relu:
        node = node.args[0]
    for i, (u, f) in enumerate(zip(units, factors)):
        c = 0.0 if constants is None else float(constants[i])
        _write_node(plan, model, gm, node, torch.tensor([u]), float(f), torch.tensor([(1.0 - float(f)) * c]),
                    is_site=not through_relu)
