"""Unit ablation and scaling by editing weights, so the edited model can be saved and shipped.

A unit (conv channel, MLP neuron) at a site becomes `factor * a + offset` (ablation:
factor 0 with offset 0, or the unit's clean mean: "mean ablation"; scaling: factor f).
No run-time hook: the change is folded into parameters, on one of two sides:

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

Transformers: `blocks.L.mlp.hook_post` (MLP neurons) is read by the MLP output projection
(columns, any family); `mlp.hook_pre`, `mlp.hook_out` and `attn.hook_out` are written by a
projection (rows and bias). The residual stream (`hook_resid_*`, embeddings) is read through
weightless skip connections and LayerNorm, so a unit there cannot be folded into weights;
`ablation_hook` does it at run time instead.

Unit gates (CNNs): a gate f in [0, 1] moves a unit's pre-activation toward its constant,
`relu(f*z + (1-f)*c)`, which the BatchNorm before the ReLU writes exactly for any f
(`gate_site`, `gated_units`, `multi_site_delta(..., factors=...)`). `learn_unit_gates`
trains one gate per unit of every site at once (trojan surgery's `method="mask"`).

Every fitted delta is checked: on the handle's dummy input, the weight-edited model must
match the run-time hook (`unit_selection.units_removed`, `gated_units`) numerically.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from editors.registry import register
from workbench.delta import WeightDelta, assert_unchanged
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.sites import Site, resolve_site

log = logging.getLogger(__name__)

Side = Literal["auto", "write", "read"]


class NotFoldableError(WorkbenchError):
    """The requested unit change has no exact weight edit at this site (the message says why)."""


@dataclass(frozen=True)
class UnitRequest:
    """Which units of which site; `values` (one per unit) is the offset, e.g. their clean means."""

    site: str
    units: tuple[int, ...]
    values: tuple[float, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "units": list(self.units), "values": None if self.values is None else list(self.values)}


def as_request(request: Any, *, k: int | None = None) -> UnitRequest:
    """A UnitRequest from a UnitRequest, a UnitRanking (top `k`), or a dict {site, units[, values]}."""
    from workbench.unit_selection import UnitRanking

    if isinstance(request, UnitRequest):
        return request
    if isinstance(request, UnitRanking):
        units = request.units if k is None else request.top(k)
        return UnitRequest(request.site, tuple(int(u) for u in units))
    if isinstance(request, Mapping) and "site" in request and "units" in request:
        values = request.get("values")
        return UnitRequest(str(request["site"]), tuple(int(u) for u in request["units"]),
                           None if values is None else tuple(float(v) for v in values))
    raise WorkbenchError("a unit request is a UnitRequest(site, units[, values]), a UnitRanking, or {'site': ..., 'units': [...]}")


# --------------------------------------------------------------------------------------
# Parameter edits: each is (param name, slice axis, index list, factor, offset per index or None)
# --------------------------------------------------------------------------------------


@dataclass
class _Plan:
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


def _bias_name(weight_name: str) -> str:
    return weight_name[: -len("weight")] + "bias" if weight_name.endswith("weight") else weight_name + ".bias"


def _is_conv1d_hf(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _out_axis(module: nn.Module) -> int:
    """Axis of a weight that indexes output units (Linear/Conv: 0; GPT-2 Conv1D: 1)."""
    return 1 if _is_conv1d_hf(module) else 0


def _write_module(plan: _Plan, path: str, module: nn.Module, idx: torch.Tensor, factor: float, offset: torch.Tensor | None) -> None:
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
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or _is_conv1d_hf(module):
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


def _read_module(plan: _Plan, path: str, module: nn.Module, idx: torch.Tensor, factor: float, offset: torch.Tensor | None) -> None:
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
    if isinstance(module, nn.Linear) or _is_conv1d_hf(module):
        in_axis = 0 if _is_conv1d_hf(module) else 1
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


def _write_node(plan: _Plan, model: nn.Module, gm: Any, node: Any, idx: torch.Tensor, factor: float,
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


def _read_node(plan: _Plan, model: nn.Module, gm: Any, node: Any, idx: torch.Tensor, factor: float,
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


def _canonical_kind(site: Site) -> str | None:
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


def _plan_transformer(plan: _Plan, handle: ModelHandle, site: Site, idx: torch.Tensor, factor: float,
                      offset: torch.Tensor | None, side: Side) -> str:
    model = handle.model
    site_map = handle.arch.site_map
    kind = _canonical_kind(site)
    module = model.get_submodule(site.module_path)
    direct_linear = isinstance(module, nn.Linear) or _is_conv1d_hf(module)
    if site.side == "input" and direct_linear and side in ("auto", "read"):
        _read_module(plan, site.module_path, module, idx, factor, offset)
        return "read"
    if site.side == "output" and (isinstance(module, (nn.Linear, nn.BatchNorm1d)) or _is_conv1d_hf(module)):
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


def _plan_graph(plan: _Plan, handle: ModelHandle, site: Site, idx: torch.Tensor, factor: float,
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
        trial = _Plan(model)
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


def check_units(handle: ModelHandle, site: str | Site, units: Sequence[int]) -> list[int]:
    """Validate unit indices against the site's width (clear error when out of range or empty)."""
    from workbench.unit_selection import site_units

    n = site_units(handle, site)
    out: list[int] = []
    for u in units:
        if isinstance(u, torch.Tensor) and u.numel() == 1:
            u = int(u)
        if isinstance(u, bool) or not isinstance(u, int):
            raise WorkbenchError(f"unit {u!r} is not an integer index")
        u = int(u)
        if not 0 <= u < n:
            raise WorkbenchError(f"unit {u} is out of range: site {site if isinstance(site, str) else site.name} has units 0..{n - 1}")
        if u not in out:
            out.append(u)
    if not out:
        raise WorkbenchError("no units given; pass at least one unit index")
    return out


def unit_delta(handle: ModelHandle, request: Any, *, factor: float = 0.0, side: Side = "auto", verify: bool = True,
               method: str = "ablate", extra: Mapping[str, Any] | None = None) -> WeightDelta:
    """A WeightDelta that makes units `factor * a + values` (values default 0), folded into weights.

    Raises NotFoldableError (a WorkbenchError) with the reason and the hook alternative when
    no exact weight edit exists. With `verify`, the edited model is compared with the
    run-time hook on the dummy input.
    """
    req = as_request(request)
    site = resolve_site(handle, req.site)
    units = check_units(handle, site, req.units)
    if req.values is not None and len(req.values) != len(req.units):
        raise WorkbenchError(f"{len(req.values)} values for {len(req.units)} units; give one value per unit")
    if side not in ("auto", "write", "read"):
        raise WorkbenchError(f"side must be 'auto', 'write' or 'read'; got {side!r}")
    idx = torch.tensor(units, dtype=torch.long)
    offset = None
    if req.values is not None:
        by_unit = dict(zip((int(u) for u in req.units), req.values))
        offset = torch.tensor([float(by_unit[u]) for u in units])
    model = handle.model
    with assert_unchanged(model):
        plan = _Plan(model)
        if handle.arch.site_map is not None:
            used = _plan_transformer(plan, handle, site, idx, float(factor), offset, side)
        else:
            used = _plan_graph(plan, handle, site, idx, float(factor), offset, side)
        if not plan.changes:
            raise WorkbenchError(f"factor {factor} with no values changes nothing; use factor != 1 or give values")
        delta = WeightDelta.from_model(
            model, plan.changes, method=method, request=req.to_json(),
            extra={"site": site.name, "units": units, "factor": float(factor), "side": used,
                   "values": None if offset is None else offset.tolist(), "params": sorted(plan.changes), **dict(extra or {})},
        )
        if verify:
            _verify(handle, site, units, float(factor), offset, delta)
    log.info("%s %s units %s (factor %s) on the %s side: %s", method, site.name, units[:10], factor, used, sorted(plan.changes))
    return delta


def _verify(handle: ModelHandle, site: Site, units: list[int], factor: float, offset: torch.Tensor | None, delta: WeightDelta) -> None:
    from workbench.models import dummy_input, run_model

    x = dummy_input(handle, batch_size=2)
    if isinstance(x, torch.Tensor) and handle.preprocess is not None:
        g = torch.Generator().manual_seed(0)
        lo, hi = handle.preprocess.input_range
        x = (lo + (hi - lo) * torch.rand(x.shape, generator=g)).to(x.device)
    model = handle.model
    with torch.no_grad():
        with ablation_hook(handle, site, units, factor=factor, values=offset):
            want = _logits(run_model(model, x))
        with delta.applied(model):
            got = _logits(run_model(model, x))
    scale = float(want.abs().max().clamp(min=1.0))
    err = float((want - got).abs().max())
    if err > 1e-4 * scale:
        raise WorkbenchError(f"internal check failed: the weight edit differs from the run-time edit by {err:.3g} on a test input "
                             f"(site {site.name}); please report this. The run-time hook ablation_hook is exact.")


def _logits(out: Any) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits.float()
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state.float()
    if isinstance(out, (tuple, list)):
        return out[0].float()
    return out.float()


@contextmanager
def ablation_hook(handle: ModelHandle, site: str | Site, units: Sequence[int], *, factor: float = 0.0,
                  values: torch.Tensor | Sequence[float] | None = None) -> Iterator[None]:
    """Run-time equivalent (any site, incl. the residual stream): units become factor * a + values."""
    from workbench.hooks import edit
    from workbench.unit_selection import unit_axis

    resolved = resolve_site(handle, site)
    idx = torch.as_tensor(list(units), dtype=torch.long)
    off = None if values is None else torch.as_tensor(values, dtype=torch.float32)

    def fn(act: torch.Tensor) -> None:
        axis = unit_axis(act, handle)
        sl: list[Any] = [slice(None)] * act.ndim
        sl[axis] = idx.to(act.device)
        part = act[tuple(sl)] * factor
        if off is not None:
            shape = [1] * act.ndim
            shape[axis] = -1
            part = part + off.to(act).reshape(shape)
        act[tuple(sl)] = part

    with edit(handle, {resolved: fn}):
        yield


def unit_means(handle: ModelHandle, site: str | Site, inputs: Any, units: Sequence[int]) -> tuple[float, ...]:
    """The units' mean activations over `inputs` (the constants of mean ablation)."""
    from workbench.unit_selection import unit_activations

    acts = unit_activations(handle, site, inputs)
    return tuple(float(v) for v in acts[:, list(units)].mean(0))


@register("ablate")
@dataclass(frozen=True)
class UnitAblation:
    """Ablate (factor 0) or scale units by a weight edit; `side`: write, read, or auto (write, then read).

    `fit(handle, request)`: request is a UnitRequest (site, units, optional per-unit values:
    the constant that replaces the unit, e.g. its clean mean), a UnitRanking (all ranked
    units; pass a UnitRequest to choose k), or a dict.
    """

    factor: float = 0.0
    side: Side = "auto"
    verify: bool = True

    method: ClassVar[str] = "ablate"

    def __post_init__(self) -> None:
        if self.side not in ("auto", "write", "read"):
            raise WorkbenchError(f"side must be 'auto', 'write' or 'read'; got {self.side!r}")

    def fit(self, handle: ModelHandle, request: Any) -> WeightDelta:
        return unit_delta(handle, request, factor=self.factor, side=self.side, verify=self.verify,
                          method=self.method, extra={"config": asdict(self)})


# --------------------------------------------------------------------------------------
# Trojan surgery on ShapesNet
# --------------------------------------------------------------------------------------

SURGERY_SITES: tuple[str, ...] = ("stem.relu", "layer1.relu1", "layer2.relu1", "layer2.relu2", "layer3.relu1", "layer3.relu2")
SURGERY_KS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)


def trojan_surgery(
    handle: ModelHandle,
    trojan_name: str,
    *,
    n_units: int | None = None,
    method: str = "activation_difference",
    site: str | None = None,
    seed: int = 0,
    n_random_draws: int = 5,
    n_select: int = 128,
    n_eval: int = 500,
    n_clean: int = 1000,
    n_ref: int | None = None,
    value: Literal["mean", "zero"] = "mean",
    clean_budget: float = 0.01,
    sites: Sequence[str] = SURGERY_SITES,
    shapley_samples: int = 8,
    curve_ks: Sequence[int] | None = None,
    greedy_candidates: int = 12,
    greedy_kl_weight: float = 5.0,
    mask_config: GateConfig | None = None,
    mask_mode: Literal["scale", "hard"] = "scale",
    mask_clean_margin: float = 0.75,
    mask_refits: int = 2,
    return_delta: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Remove the units that carry a ShapesNet trojan; measure attack success and clean accuracy.

    `method="greedy"` selects across sites instead of within one (see `greedy_units`): the
    candidates are each site's `greedy_candidates` best units by activation difference, the
    edit may touch several sites, and "site" in the result names them joined by "+".
    `method="mask"` learns a gate for every unit of every foldable site at once
    (`learn_unit_gates`, budget `mask_config.steps`), then keeps the k units whose gates moved most
    (`choose_gates`: k chosen on the selection data, within `mask_clean_margin` of the clean
    budget; the gates themselves are fitted on as many scenes again, drawn after those).
    In "scale" mode, when all the learned gates together cost more than that margin on the
    selection scenes, the clean term's weight (`GateConfig.kl_weight`, the multiplier of the
    clean constraint) doubles and the gates are learned again, at most `mask_refits` times:
    truncating an over-budget solution to its first k units breaks the balance the gates found
    jointly. The fit whose chosen option is best on the selection scenes (lowest attack success
    within the margin) is kept.
    `mask_mode="scale"` keeps their learned factors (each unit scaled toward its clean mean, or
    away from it where the gate learned to amplify),
    "hard" mean-ablates them. The result then lists one factor per unit under "factors", and
    the random control gates as many random units per site with the same factors.

    Selection uses its own data (seeded `seed`): `n_select` scenes of the trojan's source
    classes, clean and with the trigger (exact pairs), plus `n_ref` clean scenes of all
    classes for the units' mean values and the clean-accuracy budget (default 3000 for "mask", whose
    choice of k turns on clean-accuracy differences of a fraction of a point that 1000 scenes do not
    resolve; 1000 otherwise) (`value="mean"` replaces a unit by its clean mean, which is folded into the
    BatchNorm that writes it; "zero" zeroes it). `site=None` picks, on the selection data
    only, the site (from `sites`) and, when `n_units` is None, the smallest count in
    `SURGERY_KS` whose removal cuts the selection-set attack success most while costing
    at most `clean_budget` of selection-set clean accuracy. Measurement uses fresh scenes
    (seed + 1000): `n_eval` triggered scenes, `n_clean` clean ones, the same scenes before and
    after. The control removes the same number of random units at the same site in
    `n_random_draws` seeded draws (mean reported). `curve_ks` adds attack success vs units
    removed, treatment and random, to the result. The result is JSON-serializable; with
    `return_delta=True` it also holds the fitted WeightDelta under "delta".
    """
    from workbench.unit_selection import select_units, unit_activations
    from workbench.zoo.shapesnet import world_of

    if mask_refits < 0:
        raise WorkbenchError(f"mask_refits must be >= 0 (how often over-budget gates are relearned); got {mask_refits}")
    if n_ref is not None and n_ref < 1:
        raise WorkbenchError(f"n_ref must be a positive number of clean selection scenes (or None for the default); got {n_ref}")
    if n_ref is None:
        n_ref = 3000 if method == "mask" else 1000
    world = world_of(handle)
    ti = world.trojans.index(trojan_name)
    trojan = world.trojans[ti]
    target = world.class_index(trojan.target)
    pool = [c for c in range(len(world.classes)) if c != target] if trojan.source is None else [world.class_index(trojan.source)]
    if n_units is not None and n_units < 1:
        raise WorkbenchError(f"n_units must be a positive number of units; got {n_units}")
    if n_random_draws < 1:
        raise WorkbenchError(f"n_random_draws must be at least 1; got {n_random_draws}")
    model = handle.model
    was_training = model.training
    model.eval()
    try:
        g = torch.Generator().manual_seed(seed)
        sel = world.sample(n_select, generator=g, classes=pool)
        x_sel = _render(world, sel)
        x_sel_trig = _render(world, world.implant(sel, ti, generator=g))
        ref = world.sample(max(n_select, n_ref), generator=g)
        x_ref, y_ref = _render(world, ref), ref.labels
        ge = torch.Generator().manual_seed(seed + 1000)
        ev = world.sample(n_eval, generator=ge, classes=pool)
        x_ev_trig = _render(world, world.implant(ev, ti, generator=ge))
        clean = world.sample(n_clean, generator=ge)
        x_clean, y_clean = _render(world, clean), clean.labels

        def rank(s: str) -> list[tuple[str, list[int]]]:
            """Candidate orderings of the site's units (activation difference tries both scalings)."""
            if method == "activation_difference":
                return [(f"activation_difference(normalize={norm})",
                         select_units(handle, s, method=method, positive=x_sel_trig, negative=x_sel, normalize=norm,
                                      progress=False).units) for norm in (True, False)]
            if method == "attribution":
                r = select_units(handle, s, method=method, inputs=x_sel_trig, target=target, baselines=x_sel, steps=8, progress=False)
            elif method == "shapley":
                r = select_units(handle, s, method=method, inputs=x_sel_trig, target=target, negative=x_sel,
                                 n_candidates=16, n_samples=shapley_samples, seed=seed, progress=progress)
            elif method == "dissection":
                masks = world.concept_masks(world.implant(sel, ti, generator=torch.Generator().manual_seed(seed)))
                concept = {"natural": "trigger", "patch": "patch"}.get(trojan.kind, f"texture:{trojan.trigger.texture}")
                r = select_units(handle, s, method=method, images=x_sel_trig, masks=masks, concept=concept)
            else:
                raise WorkbenchError(f"unknown selection method {method!r}; choose activation_difference, attribution, shapley or dissection")
            return [(method, r.units)]

        # each site's clean unit means (mean ablation's constants), computed when a site is first used
        means = _OnDemand(lambda s: unit_activations(handle, s, x_ref).mean(0))
        values = None if value == "zero" else means

        def removed(s: str, units: list[int]) -> Any:
            return _removed_pairs(handle, [(s, u) for u in units], values)

        def asr(x: torch.Tensor) -> float:
            return float((_predict(model, x) == target).float().mean())

        def acc(x: torch.Tensor, y: torch.Tensor) -> float:
            return float((_predict(model, x) == y).float().mean())

        base_sel_asr, base_sel_acc = asr(x_sel_trig), acc(x_ref, y_ref)
        candidates = [site] if site is not None else list(sites)
        foldable, skipped = _foldable_sites(handle, candidates, value, strict=site is not None)
        selection: dict[str, Any] = {"n_select": n_select, "asr": round(base_sel_asr, 4), "clean": round(base_sel_acc, 4)}
        factors: list[float] | None = None
        if method == "mask":
            if mask_mode not in ("scale", "hard"):
                raise WorkbenchError(f"mask_mode must be 'scale' or 'hard'; got {mask_mode!r}")
            # the gates are learned on scenes of their own (drawn after the selection scenes), so that choosing k
            # on the selection scenes is not judged on the data the gates were fitted to (clean accuracy overfits)
            fit_sel = world.sample(n_select, generator=g, classes=pool)
            x_fit_trig = _render(world, world.implant(fit_sel, ti, generator=g))
            x_fit_ref = _render(world, world.sample(max(n_select, n_ref), generator=g))

            def sel_score(ps: Sequence[tuple[str, int]], fs: Sequence[float]) -> tuple[float, float]:
                with gated_units(handle, ps, fs, values):
                    return asr(x_sel_trig), acc(x_ref, y_ref)

            # k is chosen on scenes the gates were not fitted to, among a few nested options: a smaller
            # winner's curse than greedy's (which keeps half the budget in reserve), so a quarter is kept
            margin = mask_clean_margin * clean_budget
            gate_cfg, refits, best_fit = mask_config or GateConfig(), [], None
            while True:
                gates_, trace_ = learn_unit_gates(handle, foldable, triggered=x_fit_trig, clean=x_fit_ref, target=target,
                                                  values=values, config=gate_cfg, seed=seed, progress=progress)
                chosen = choose_gates(gates_, sel_score, base_acc=base_sel_acc, clean_budget=margin, mode=mask_mode,
                                      max_units=n_units)
                pick = next(g_ for g_ in chosen[2] if g_["k"] == len(chosen[0]))
                # every fit is judged as choose_gates judges its options
                key = _option_key(pick["asr"], base_sel_acc - pick["clean"], pick["k"], margin)
                if best_fit is None or key < best_fit[0]:
                    best_fit = (key, gates_, trace_, chosen, gate_cfg)
                full_drop = base_sel_acc - chosen[2][-1]["clean"]  # the largest option: the gates' joint solution
                if (mask_mode == "hard" or full_drop <= margin + 1e-9 or len(refits) >= mask_refits
                        or gate_cfg.kl_weight == 0):
                    break
                refits.append({"kl_weight": gate_cfg.kl_weight, "k": chosen[2][-1]["k"], "clean_drop": round(full_drop, 4),
                               "chosen_k": pick["k"], "chosen_asr": pick["asr"]})
                gate_cfg = replace(gate_cfg, kl_weight=2 * gate_cfg.kl_weight)
            _, gates, trace, (pairs, factors, grid), gate_cfg = best_fit
            other_mode: Literal["scale", "hard"] = "hard" if mask_mode == "scale" else "scale"
            other = choose_gates(gates, sel_score, base_acc=base_sel_acc, clean_budget=margin,
                                 mode=other_mode, max_units=n_units)
            how, units_out = f"mask({mask_mode})", [[s_, u] for s_, u in pairs]
            curve_order = gate_order(gates)
            selection.update(grid=grid, trace=trace, config=asdict(gate_cfg), refits=refits, clean_margin=margin,
                             gates={s_: [round(float(v), 4) for v in g_] for s_, g_ in gates.items()})
            delta = multi_site_delta(handle, pairs, values, factors=factors,
                                     extra={"trojan": trojan_name, "selection": method, "mode": mask_mode})
        elif method == "greedy":
            pool_g: list[tuple[str, int]] = []
            for s_ in foldable:
                order_ = select_units(handle, s_, method="activation_difference", positive=x_sel_trig, negative=x_sel,
                                      normalize=True, progress=False).units
                pool_g += [(s_, u) for u in order_[:greedy_candidates]]
            pairs, steps = greedy_units(handle, pool_g, triggered=x_sel_trig, clean=x_ref, clean_labels=y_ref,
                                        target=target, values=values, kl_weight=greedy_kl_weight,
                                        clean_budget=clean_budget / 2, max_units=n_units or 16, progress=progress)
            if not pairs:
                raise WorkbenchError(f"greedy selection found no unit whose removal lowers {trojan_name}'s attack "
                                     f"success within half the clean budget ({clean_budget / 2:g}) on the selection data")
            how, curve_order, units_out = "greedy(activation_difference candidates)", pairs, [[s_, u] for s_, u in pairs]
            selection.update(grid=steps, candidates=len(pool_g))
            delta = multi_site_delta(handle, pairs, values, extra={"trojan": trojan_name, "selection": method})
        else:
            choice: list[dict[str, Any]] = []
            ks = [n_units] if n_units is not None else list(SURGERY_KS)
            best: tuple[float, float, int, str, list[int], str] | None = None
            rankings: dict[tuple[str, str], list[int]] = {}
            for s in foldable:
                for how, order in rank(s):
                    rankings[(s, how)] = order
                    for k in ks:
                        if k > len(order):
                            continue
                        units = order[:k]
                        with removed(s, units):
                            a, c = asr(x_sel_trig), acc(x_ref, y_ref)
                        choice.append({"site": s, "ranking": how, "k": k, "asr": round(a, 4), "clean": round(c, 4)})
                        ok = base_sel_acc - c <= clean_budget + 1e-9
                        # lowest attack success within the clean budget; then the smaller clean cost, then fewer units
                        key = (a if ok else 2.0 + a, base_sel_acc - c, k, s, units, how)
                        if best is None or key[:3] < best[:3]:
                            best = key
            assert best is not None
            _, _, k, s, units, how = best
            pairs, curve_order, units_out = [(s, u) for u in units], [(s, u) for u in rankings[(s, how)]], units
            selection["grid"] = choice
            vals = tuple(float(v) for v in means[s][units]) if value == "mean" else None
            delta = unit_delta(handle, UnitRequest(s, tuple(units), vals), factor=0.0, method="ablate",
                               extra={"trojan": trojan_name, "selection": method})
        selection["skipped_sites"] = skipped

        # measurement, on fresh scenes: the edit, and as many random units per site (disjoint, several draws)
        asr_before, clean_before = asr(x_ev_trig), acc(x_clean, y_clean)
        with delta.applied(model):
            asr_after, clean_after = asr(x_ev_trig), acc(x_clean, y_clean)
        rand_asr, rand_clean = [], []
        for d in range(n_random_draws):
            with _control(handle, pairs, factors, values, seed=seed * 1000 + d):
                rand_asr.append(asr(x_ev_trig))
                rand_clean.append(acc(x_clean, y_clean))
        by_site: dict[str, list[int]] = {}
        for s_, u in pairs:
            by_site.setdefault(s_, []).append(u)
        result = _surgery_result(
            trojan_name, trojan, "+".join(by_site), units_out, len(pairs), method, how, value, seed, asr_before,
            asr_after, clean_before, clean_after, rand_asr, rand_clean, n_random_draws, n_eval, n_clean, selection)
        result["units_by_site"] = by_site
        if factors is not None:
            result["factors"] = [round(f, 6) for f in factors]
            result["unit_values"] = [None if values is None else float(values[s_][u]) for s_, u in pairs]
            # the other hardening of the same gates (its own k, chosen the same way), measured on the same fresh scenes
            o_pairs, o_factors, o_grid = other
            with gated_units(handle, o_pairs, o_factors, values):
                o_asr, o_clean = asr(x_ev_trig), acc(x_clean, y_clean)
            o_cut = round(1 - o_asr / asr_before, 4) if asr_before > 0 else None
            result["alternative"] = {
                "mode": other_mode, "n_units": len(o_pairs), "units": [[s_, u] for s_, u in o_pairs],
                "factors": [round(f, 6) for f in o_factors], "asr_after": round(o_asr, 4), "clean_after": round(o_clean, 4),
                "asr_relative_cut": o_cut, "clean_drop": round(clean_before - o_clean, 4), "grid": o_grid,
                "target_met": bool(o_cut is not None and o_cut >= 0.9 and clean_before - o_clean <= 0.01 + 1e-9)}
        if return_delta:
            result["delta"] = delta
        if curve_ks:  # attack success vs units removed along the selection's order, and random units (not disjoint)
            curve = []
            for kk in curve_ks:
                if kk > len(curve_order):
                    continue
                cf = None if factors is None else _curve_factors(gates, curve_order[:kk], mask_mode)
                with _treated(handle, curve_order[:kk], cf, values):
                    t_asr, t_acc = asr(x_ev_trig), acc(x_clean, y_clean)
                r_asr, r_acc = [], []
                for d in range(n_random_draws):
                    with _control(handle, curve_order[:kk], cf, values, seed=seed * 1000 + 500 + d, disjoint=False):
                        r_asr.append(asr(x_ev_trig))
                        r_acc.append(acc(x_clean, y_clean))
                curve.append({"k": kk, "asr": round(t_asr, 4), "clean": round(t_acc, 4),
                              "random_asr": round(sum(r_asr) / len(r_asr), 4),
                              "random_clean": round(sum(r_acc) / len(r_acc), 4)})
            result["curve"] = curve
        return result
    finally:
        model.train(was_training)


def gate_order(gates: Mapping[str, torch.Tensor]) -> list[tuple[str, int]]:
    """All (site, unit) pairs, the gate furthest from 1 first (closed or amplified; ties: site
    order, then unit index)."""
    sites = list(gates)
    pairs = [(s, u) for s in sites for u in range(len(gates[s]))]
    return sorted(pairs, key=lambda p: (-abs(1.0 - float(gates[p[0]][p[1]])), sites.index(p[0]), p[1]))


def _curve_factors(gates: Mapping[str, torch.Tensor], pairs: Sequence[tuple[str, int]], mode: str) -> list[float]:
    return [0.0 if mode == "hard" else float(gates[s][u]) for s, u in pairs]


MASK_KS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96)


def _option_key(asr: float, drop: float, k: int, clean_budget: float) -> tuple[float, float, int]:
    """How `choose_gates` orders options: within the clean budget, lowest attack success (then the
    smaller drop, fewer units); beyond it, the cheapest."""
    return (asr, drop, k) if drop <= clean_budget + 1e-9 else (2.0 + drop, asr, k)


def choose_gates(gates: Mapping[str, torch.Tensor],
                 score: Callable[[Sequence[tuple[str, int]], Sequence[float]], tuple[float, float]], *, base_acc: float, clean_budget: float,
                 mode: Literal["scale", "hard"] = "scale", max_units: int | None = None, min_closure: float = 0.05,
                 ks: Sequence[int] = MASK_KS) -> tuple[list[tuple[str, int]], list[float], list[dict[str, Any]]]:
    """Harden learned gates: keep the k most-moved units (scaled by their gates, or removed).

    `score(pairs, factors) -> (attack success, clean accuracy)` on selection data. k runs over
    `ks` (or exactly `max_units`), among units whose gate moved at least `min_closure` from 1
    ("hard" mode: closed by that much; removing an amplified unit is not what it learned) and
    at most half of each site's units (so that a disjoint random control of the same size exists);
    the choice is the lowest attack success whose clean accuracy is within `clean_budget` of
    `base_acc` (then fewer units), or the smallest clean cost when no option is within it.
    Returns the pairs, their factors (0 for "hard") and the grid.
    """
    order: list[tuple[str, int]] = []
    per_site: dict[str, int] = {}
    for p in gate_order(gates):
        moved = 1 - float(gates[p[0]][p[1]])
        if (moved if mode == "hard" else abs(moved)) >= min_closure and per_site.get(p[0], 0) < len(gates[p[0]]) // 2:
            order.append(p)
            per_site[p[0]] = per_site.get(p[0], 0) + 1
    if not order:
        raise WorkbenchError(f"no unit's gate moved by {min_closure} or more: the learned gates leave the model as it "
                             "was (raise GateConfig.steps or lower GateConfig.sparsity)")
    options = [max_units] if max_units is not None else [k for k in ks if k < len(order)] + [min(len(order), max(ks))]
    grid: list[dict[str, Any]] = []
    best: tuple[float, float, int] | None = None
    for k in sorted(set(min(k, len(order)) for k in options)):
        fs = _curve_factors(gates, order[:k], mode)
        a, c = score(order[:k], fs)
        grid.append({"k": k, "asr": round(a, 4), "clean": round(c, 4)})
        key = _option_key(a, base_acc - c, k, clean_budget)
        if best is None or key < best:
            best = key
    assert best is not None
    k = best[2]
    return order[:k], _curve_factors(gates, order[:k], mode), grid


@contextmanager
def _treated(handle: ModelHandle, pairs: Sequence[tuple[str, int]], factors: Sequence[float] | None,
             values: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Run-time removal (factors None) or gating of the pairs."""
    cm = _removed_pairs(handle, pairs, values) if factors is None else gated_units(handle, pairs, factors, values)
    with cm:
        yield


def _control(handle: ModelHandle, pairs: Sequence[tuple[str, int]], factors: Sequence[float] | None,
             values: Mapping[str, torch.Tensor] | None, *, seed: int, disjoint: bool = True) -> Any:
    """The random control: as many random units per site as `pairs` has there, with the same
    factors per site (in the order given) when the treatment gates instead of removing."""
    rp = _random_pairs(handle, pairs, seed=seed, disjoint=disjoint)
    if factors is None:
        return _removed_pairs(handle, rp, values)
    grouped = _group(pairs, factors)
    rf = []
    pos = {s: 0 for s in grouped}
    for s, _ in rp:
        rf.append(grouped[s][1][pos[s]])
        pos[s] += 1
    return gated_units(handle, rp, rf, values)


def _surgery_result(trojan_name: str, trojan: Any, site: str, units: Any, k: int, method: str, ranking: str,
                    value: str, seed: int, asr_before: float, asr_after: float, clean_before: float, clean_after: float,
                    rand_asr: Sequence[float], rand_clean: Sequence[float], n_random_draws: int, n_eval: int,
                    n_clean: int, selection: dict[str, Any]) -> dict[str, Any]:
    """The JSON result of `trojan_surgery` (one shape for single-site and greedy selection)."""
    cut = round(1 - asr_after / asr_before, 4) if asr_before > 0 else None
    drop = round(clean_before - clean_after, 4)
    return {
        "trojan": trojan_name, "kind": trojan.kind, "target": trojan.target, "source": trojan.source,
        "site": site, "units": units, "n_units": k, "method": method, "ranking": ranking, "value": value, "seed": seed,
        "asr_before": round(asr_before, 4), "asr_after": round(asr_after, 4),
        "clean_before": round(clean_before, 4), "clean_after": round(clean_after, 4),
        "asr_relative_cut": cut, "clean_drop": drop,
        "random_asr_after": round(sum(rand_asr) / len(rand_asr), 4),
        "random_asr_draws": [round(v, 4) for v in rand_asr],
        "random_clean_after": round(sum(rand_clean) / len(rand_clean), 4),
        "n_random_draws": n_random_draws, "n_eval": n_eval, "n_clean": n_clean,
        "selection": selection,
        "target_met": bool(cut is not None and cut >= 0.9 and drop <= 0.01 + 1e-9),
    }


class _OnDemand(dict):  # type: ignore[type-arg]
    """A dict that computes a missing key's value with `fn(key)` once, then keeps it."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def __missing__(self, key: Any) -> Any:
        self[key] = value = self.fn(key)
        return value


def _foldable_sites(handle: ModelHandle, candidates: Sequence[str], value: str, *,
                    strict: bool = False) -> tuple[list[str], dict[str, str]]:
    """The sites where this kind of removal folds into weights exactly, and why the others do not
    (`strict`: a site that does not fold is an error, e.g. the one site the user asked for)."""
    ok, skipped = [], {}
    for s in candidates:
        try:
            unit_delta(handle, UnitRequest(s, (0,), (1.0,) if value == "mean" else None), verify=False)
            ok.append(s)
        except NotFoldableError as exc:
            if strict:
                raise
            skipped[s] = str(exc)
    if not ok:
        raise WorkbenchError(f"no candidate site allows an exact weight edit for {value} ablation: {skipped}")
    return ok, skipped


@contextmanager
def _removed_pairs(handle: ModelHandle, pairs: Sequence[tuple[str, int]],
                   values: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Run-time removal of (site, unit) pairs at several sites at once (unit -> `values[site][unit]`, or 0)."""
    from contextlib import ExitStack

    by_site: dict[str, list[int]] = {}
    for s, u in pairs:
        by_site.setdefault(s, []).append(u)
    with ExitStack() as stack:
        for s, us in by_site.items():
            vals = None if values is None else values[s][us]
            stack.enter_context(ablation_hook(handle, s, us, values=vals))
        yield


def _random_pairs(handle: ModelHandle, pairs: Sequence[tuple[str, int]], *, seed: int,
                  disjoint: bool = True) -> list[tuple[str, int]]:
    """As many random units per site as `pairs` has there (the control), disjoint from them unless told."""
    from workbench.unit_selection import random_units, site_units

    by_site: dict[str, list[int]] = {}
    for s, u in pairs:
        by_site.setdefault(s, []).append(u)
    out = []
    for i, (s, us) in enumerate(by_site.items()):
        out += [(s, u) for u in random_units(site_units(handle, s), len(us), seed=seed + 7919 * i,
                                             exclude=us if disjoint else ())]
    return out


def multi_site_delta(handle: ModelHandle, pairs: Sequence[tuple[str, int]],
                     values: Mapping[str, torch.Tensor] | None, *, factors: Sequence[float] | None = None,
                     extra: Mapping[str, Any] | None = None) -> WeightDelta:
    """One WeightDelta removing (site, unit) pairs at several sites (mean values, or zero with None).

    With `factors` (one per pair) the units are gated instead (`gate_site`: pre-activation
    z -> f*z + (1-f)*c; f = 0 is the same removal), and the result is checked against
    `gated_units` on a random input. Sites are folded in network order, each fitted with the
    previous ones applied, because a read-side fold of one site and a write-side fold of the
    next can touch the same parameter; `compose_on` checks that order.
    """
    from workbench.delta import compose_on

    grouped = _group(pairs, factors)
    order = {name: i for i, (name, _) in enumerate(handle.model.named_modules())}
    model = handle.model

    def part(s: str) -> WeightDelta:
        us, fs = grouped[s]
        vals = None if values is None else tuple(float(v) for v in values[s][us])
        if factors is None:
            return unit_delta(handle, UnitRequest(s, tuple(us), vals), factor=0.0, method="ablate", extra=extra)
        return _gate_site_delta(handle, s, us, fs, vals, extra=extra)

    total: WeightDelta | None = None
    for s in sorted(grouped, key=lambda name: order.get(resolve_site(handle, name).module_path, 0)):
        if total is None:
            total = part(s)
        else:
            with total.applied(model):
                nxt = part(s)
            total = compose_on(model, total, nxt)
    if total is None:
        raise WorkbenchError("no units given; pass at least one (site, unit) pair")
    if factors is not None:
        _check_gates(handle, pairs, factors, values, total)
    return total


@torch.no_grad()
def greedy_units(handle: ModelHandle, candidates: Sequence[tuple[str, int]], *, triggered: torch.Tensor,
                 clean: torch.Tensor, clean_labels: torch.Tensor, target: int,
                 values: Mapping[str, torch.Tensor] | None,
                 kl_weight: float = 5.0, clean_budget: float = 0.005, max_units: int = 16,
                 progress: bool = False) -> tuple[list[tuple[str, int]], list[dict[str, Any]]]:
    """Forward selection of units (across sites) that remove a behaviour at the least clean cost.

    Each step adds the candidate whose removal (together with those chosen) most lowers
    p(target | triggered) + kl_weight * KL(unedited || edited) on the clean inputs, among those
    that keep clean accuracy within `clean_budget` of the unedited model; it stops when no
    candidate lowers that objective, attack success on `triggered` reaches 1% or `max_units`
    are chosen. Both terms are smooth, so steps are not decided by a handful of flipped
    images (accuracy alone, measured on the same data, overfits: RESULTS.md). Returns the
    chosen (site, unit) pairs in order and one record per step.
    """
    from tqdm.auto import tqdm

    model = handle.model

    def logp(x: torch.Tensor) -> torch.Tensor:
        dev = next(model.parameters()).device
        return torch.cat([model(x[i:i + 500].to(dev)).float().log_softmax(-1).cpu() for i in range(0, len(x), 500)])

    ref = logp(clean)
    base_acc = float((ref.argmax(-1) == clean_labels).float().mean())

    def score(pairs: Sequence[tuple[str, int]]) -> tuple[float, float, float]:
        with _removed_pairs(handle, pairs, values):
            trig, lp = logp(triggered), logp(clean)
        kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
        asr = float((trig.argmax(-1) == target).float().mean())
        return float(trig[:, target].exp().mean()) + kl_weight * kl, asr, float((lp.argmax(-1) == clean_labels).float().mean())

    chosen: list[tuple[str, int]] = []
    steps: list[dict[str, Any]] = []
    current = score([])[0]
    bar = tqdm(total=max_units, desc="greedy unit selection", disable=not progress, leave=False)
    while len(chosen) < max_units:
        best: tuple[float, float, float, tuple[str, int]] | None = None
        for c in candidates:
            if c in chosen:
                continue
            obj, asr, acc = score([*chosen, c])
            if base_acc - acc > clean_budget + 1e-9:
                continue
            if best is None or obj < best[0]:
                best = (obj, asr, acc, c)
        if best is None or best[0] >= current - 1e-9:
            break
        current = best[0]
        chosen.append(best[3])
        steps.append({"site": best[3][0], "unit": best[3][1], "objective": round(best[0], 5), "asr": round(best[1], 4),
                      "clean": round(best[2], 4)})
        bar.update(1)
        if best[1] <= 0.01:
            break
    bar.close()
    return chosen, steps


# --------------------------------------------------------------------------------------
# Unit gates: a unit moved part of the way to its constant, before its ReLU (learned selection)
# --------------------------------------------------------------------------------------


def gate_site(handle: ModelHandle, site: str | Site) -> Site:
    """Where a unit's gate acts: the input of the site's ReLU (its pre-activation) when the site
    is a ReLU's output, else the site itself.

    A gate f mixes the pre-activation z with the unit's constant c: f*z + (1-f)*c. The BatchNorm
    behind it writes that exactly (gamma, beta -> f*gamma, f*beta + (1-f)*c; on a residual sum
    both branches are scaled), for any f, whereas a gate after the ReLU could not be folded.
    f = 0 with c >= 0 is mean ablation (relu(c) = c); f = 1 leaves the unit alone.
    """
    resolved = resolve_site(handle, site)
    if resolved.side == "output" and isinstance(handle.model.get_submodule(resolved.module_path), nn.ReLU):
        return resolve_site(handle, f"{resolved.name}:input")
    return resolved


def _group(pairs: Sequence[tuple[str, int]], factors: Sequence[float] | None = None) -> dict[str, tuple[list[int], list[float]]]:
    """(site, unit) pairs (and one factor each, default 0) grouped by site, first appearance first."""
    if factors is not None and len(factors) != len(pairs):
        raise WorkbenchError(f"{len(factors)} gate factors for {len(pairs)} units; give one factor per unit")
    out: dict[str, tuple[list[int], list[float]]] = {}
    for i, (s, u) in enumerate(pairs):
        us, fs = out.setdefault(s, ([], []))
        if u in us:
            raise WorkbenchError(f"unit {u} of {s} is listed twice; give each unit once")
        us.append(int(u))
        fs.append(0.0 if factors is None else float(factors[i]))
    return out


@contextmanager
def gated_units(handle: ModelHandle, pairs: Sequence[tuple[str, int]], factors: Sequence[float] | None,
                values: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Run-time unit gates: each unit's pre-activation z becomes f*z + (1-f)*c (c = `values[site][unit]`,
    or 0 with None; f from `factors`, default 0). The reference that `multi_site_delta(...,
    factors=...)` is checked against."""
    from workbench.hooks import edit
    from workbench.unit_selection import unit_axis

    fns = {}
    for s, (us, fs) in _group(pairs, factors).items():
        idx = torch.tensor(us, dtype=torch.long)
        f = torch.tensor(fs, dtype=torch.float32)
        c = torch.zeros(len(us)) if values is None else values[s][idx].float()

        def fn(act: torch.Tensor, idx: torch.Tensor = idx, f: torch.Tensor = f, c: torch.Tensor = c) -> torch.Tensor:
            axis = unit_axis(act, handle)
            shape = [1] * act.ndim
            shape[axis] = -1
            sl: list[Any] = [slice(None)] * act.ndim
            sl[axis] = idx.to(act.device)
            act[tuple(sl)] = act[tuple(sl)] * f.to(act).reshape(shape) + ((1 - f) * c).to(act).reshape(shape)
            return act

        fns[gate_site(handle, s)] = fn
    with edit(handle, fns):
        yield


def _gate_site_delta(handle: ModelHandle, site: str, units: Sequence[int], factors: Sequence[float],
                     values: Sequence[float] | None, *, extra: Mapping[str, Any] | None = None) -> WeightDelta:
    """Gates on one site's units folded into the layer(s) that write its pre-activation."""
    model = handle.model
    resolved = resolve_site(handle, site)
    units = check_units(handle, resolved, units)
    if handle.arch.site_map is not None:
        raise NotFoldableError(f"unit gates fold into CNN layers (BatchNorm/conv before a ReLU); {site} is a transformer site: "
                               "use unit_delta(handle, request, factor=f) for a scale, or the run-time gated_units")
    if resolved.side != "output":
        raise NotFoldableError(f"site {resolved.name} is a layer's input; a gate needs the layer that writes the units "
                               "(give the output site, e.g. the ReLU's name)")
    gm = _trace(model)
    node = _site_node(gm, resolved)
    through_relu = _is_relu(model, gm, node)
    if through_relu:
        node = node.args[0]
    with assert_unchanged(model):
        plan = _Plan(model)
        for i, (u, f) in enumerate(zip(units, factors)):
            c = 0.0 if values is None else float(values[i])
            _write_node(plan, model, gm, node, torch.tensor([u]), float(f), torch.tensor([(1.0 - float(f)) * c]),
                        is_site=not through_relu)
        return WeightDelta.from_model(
            model, plan.changes, method="gate", request={"site": resolved.name, "units": list(units), "factors": list(factors)},
            extra={"site": resolved.name, "units": list(units), "factors": [float(f) for f in factors],
                   "values": None if values is None else [float(v) for v in values], "side": "write",
                   "params": sorted(plan.changes), **dict(extra or {})})


def _check_gates(handle: ModelHandle, pairs: Sequence[tuple[str, int]], factors: Sequence[float],
                 values: Mapping[str, torch.Tensor] | None, delta: WeightDelta) -> None:
    """The folded gates must match the run-time gates on a random input (else: a bug, say so)."""
    from workbench.models import dummy_input, run_model

    x = dummy_input(handle, batch_size=2)
    if isinstance(x, torch.Tensor) and handle.preprocess is not None:
        lo, hi = handle.preprocess.input_range
        x = (lo + (hi - lo) * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))).to(x.device)
    model = handle.model
    with torch.no_grad():
        with gated_units(handle, pairs, factors, values):
            want = _logits(run_model(model, x))
        with delta.applied(model):
            got = _logits(run_model(model, x))
    err = float((want - got).abs().max())
    if err > 1e-4 * float(want.abs().max().clamp(min=1.0)):
        raise WorkbenchError(f"internal check failed: folded unit gates differ from the run-time gates by {err:.3g}; "
                             "please report this. The run-time gated_units is exact.")


@dataclass(frozen=True)
class GateConfig:
    """How `learn_unit_gates` trains one gate per unit (`steps` is the budget knob).

    Loss per step: -log(1 - p(target | triggered)) + kl_weight * KL(unedited || edited) on clean
    inputs + sparsity * sum |1 - gate|, minibatches of `batch_triggered` / `batch_clean`
    drawn with the seed. Gates are max_gate * sigmoid(logit). With `max_gate` 1 a gate can only
    move its unit toward the clean mean, starting at sigmoid(init_logit); above 1 it may also
    amplify the unit's deviation from that mean (a unit that tells the source class from the
    trigger's target can be turned up), starting at exactly 1 (untouched).
    """

    steps: int = 300
    lr: float = 0.1
    kl_weight: float = 5.0
    sparsity: float = 0.005
    init_logit: float = 3.0
    batch_triggered: int = 128
    batch_clean: int = 256
    max_gate: float = 2.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_triggered < 1 or self.batch_clean < 1:
            raise WorkbenchError(f"GateConfig needs steps and batch sizes >= 1; got {self}")
        if self.lr <= 0 or self.kl_weight < 0 or self.sparsity < 0:
            raise WorkbenchError(f"GateConfig needs lr > 0, kl_weight >= 0 and sparsity >= 0; got {self}")
        if not 1.0 <= self.max_gate <= 10.0:
            raise WorkbenchError(f"GateConfig.max_gate must be in [1, 10] (1: gates only close; 2: a unit may also be "
                                 f"doubled); got {self.max_gate}")

    def start_logit(self) -> float:
        """The logit every gate starts at: exactly 1 (untouched) when gates may amplify, else sigmoid(init_logit)."""
        return self.init_logit if self.max_gate == 1.0 else -math.log(self.max_gate - 1.0)


def learn_unit_gates(handle: ModelHandle, sites: Sequence[str], *, triggered: torch.Tensor, clean: torch.Tensor,
                     target: int, values: Mapping[str, torch.Tensor] | None, config: GateConfig | None = None,
                     seed: int = 0, progress: bool = False) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """A gate in [0, max_gate] for every unit of `sites`, trained (Adam) to stop `target` on `triggered`.

    The relaxation scores all units of all sites jointly, with the clean-behaviour cost in the
    loss (not a hard budget), so units that only matter together are found together and a unit
    that would cost clean accuracy is closed only part of the way. Model weights are frozen;
    the model is left unchanged. Returns {site: gates (1 = untouched)} and a loss trace (every
    10th step). Same seed and inputs -> same gates.
    """
    from tqdm.auto import tqdm

    from workbench.hooks import patch
    from workbench.unit_selection import site_units

    cfg = config or GateConfig()
    model = handle.model
    dev = next(model.parameters()).device
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    logits = {s: torch.full((site_units(handle, s),), cfg.start_logit(), device=dev, requires_grad=True) for s in sites}
    consts = {s: (torch.zeros(len(v)) if values is None else values[s].float()).to(dev) for s, v in logits.items()}
    with torch.no_grad():
        ref = torch.cat([model(clean[i:i + 500].to(dev)).float().log_softmax(-1) for i in range(0, len(clean), 500)])

    def gate_fn(s: str) -> Any:
        def fn(act: torch.Tensor) -> torch.Tensor:
            shape = [1] * act.ndim
            shape[1] = -1
            g = (cfg.max_gate * torch.sigmoid(logits[s])).reshape(shape)
            return g * act + (1 - g) * consts[s].reshape(shape)
        return fn

    patches = {gate_site(handle, s): gate_fn(s) for s in sites}
    opt = torch.optim.Adam(list(logits.values()), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    trace: list[dict[str, float]] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for step in tqdm(range(cfg.steps), desc="learning unit gates", disable=not progress, leave=False):
            ti = torch.randperm(len(triggered), generator=gen)[:cfg.batch_triggered]
            ci = torch.randperm(len(clean), generator=gen)[:cfg.batch_clean]
            with patch(handle, patches):
                lt = model(triggered[ti].to(dev)).float().log_softmax(-1)
                lc = model(clean[ci].to(dev)).float().log_softmax(-1)
            attack = -torch.log1p(-lt[:, target].exp().clamp(max=1 - 1e-6)).mean()
            r = ref[ci.to(dev)]
            kl = (r.exp() * (r - lc)).sum(-1).mean()
            moved = sum((1 - cfg.max_gate * torch.sigmoid(v)).abs().sum() for v in logits.values())
            loss = attack + cfg.kl_weight * kl + cfg.sparsity * moved
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 10 == 0 or step == cfg.steps - 1:
                trace.append({"step": step, "attack": round(float(attack.detach()), 5), "kl": round(float(kl.detach()), 6),
                              "moved": round(float(moved.detach()), 3),
                              "asr": round(float((lt.argmax(-1) == target).float().mean()), 4)})
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
    return {s: (cfg.max_gate * torch.sigmoid(v.detach())).cpu() for s, v in logits.items()}, trace


def _render(world: Any, sample: Any) -> torch.Tensor:
    from workbench.devices import torch_threads

    with torch_threads(1):
        x = world.render(sample)
    assert isinstance(x, torch.Tensor)
    return x


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    dev = next(model.parameters()).device
    return torch.cat([model(x[i:i + batch_size].to(dev)).argmax(-1).cpu() for i in range(0, x.shape[0], batch_size)])


def plot_surgery_curve(results: Sequence[Mapping[str, Any]], path: Any, *,
                       xlabel: str = "units removed (mean ablation)") -> Any:
    """Attack success (left) and clean accuracy (right) vs number of units removed, treatment
    (solid) vs random units at the same site (dashed, mean of draws), one colour per trojan."""
    from workbench.plotting import pyplot, save_figure

    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, r in enumerate(results):
        curve = r.get("curve") or []
        if not curve:
            continue
        color = plt.cm.tab10(i % 10)
        ks = [c["k"] for c in curve]
        ax.plot(ks, [c["asr"] for c in curve], "-o", color=color, label=f"{r['trojan']} ({r['site']})")
        ax.plot(ks, [c["random_asr"] for c in curve], "--", color=color, alpha=0.6)
        bx.plot(ks, [c["clean"] for c in curve], "-o", color=color)
        bx.plot(ks, [c["random_clean"] for c in curve], "--", color=color, alpha=0.6)
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xlabel(xlabel)
    ax.set_ylabel("attack success rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("attack success: selected (solid) vs random units (dashed)")
    ax.legend(fontsize=7, loc="lower left")
    bx.set_ylabel("clean accuracy")
    bx.set_title("clean accuracy, same edits")
    fig.tight_layout()

    return save_figure(fig, path, dpi=100)
