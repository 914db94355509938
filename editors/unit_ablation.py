"""Unit ablation and scaling by editing weights, so the edited model can be saved and shipped.

A unit (conv channel, MLP neuron) at a site becomes `factor * a + offset` (ablation:
factor 0 with offset 0, or the unit's clean mean: "mean ablation"; scaling: factor f).
No run-time hook: `editors.folding` writes the change into the parameters that produce or
consume the unit. Where no exact weight edit exists (e.g. the residual stream of a
transformer), `ablation_hook` does the same change at run time.

Unit gates (CNNs): a gate f moves a unit's pre-activation toward its constant,
`relu(f*z + (1-f)*c)`, which the BatchNorm before the ReLU writes exactly for any f
(`gate_site`, `gated_units`, `multi_site_delta(..., factors=...)`). `learn_unit_gates`
trains one gate per unit of every given site at once.

Every fitted delta is checked: on the handle's dummy input, the weight-edited model must
match the run-time hook (`ablation_hook`, `gated_units`) numerically.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from editors.folding import FoldPlan, NotFoldableError, Side, plan_gates, plan_units
from editors.registry import register
from workbench.delta import WeightDelta, assert_unchanged
from workbench.errors import WorkbenchError, require_finite
from workbench.handle import ModelHandle
from workbench.sites import Site, resolve_site

log = logging.getLogger(__name__)


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
        plan = FoldPlan(model)
        used = plan_units(plan, handle, site, idx, float(factor), offset, side)
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
        require_finite(self)
        if self.side not in ("auto", "write", "read"):
            raise WorkbenchError(f"side must be 'auto', 'write' or 'read'; got {self.side!r}")

    def fit(self, handle: ModelHandle, request: Any) -> WeightDelta:
        return unit_delta(handle, request, factor=self.factor, side=self.side, verify=self.verify,
                          method=self.method, extra={"config": asdict(self)})


# --------------------------------------------------------------------------------------
# Several sites at once
# --------------------------------------------------------------------------------------


@contextmanager
def removed_units(handle: ModelHandle, pairs: Sequence[tuple[str, int]],
                  values: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """Run-time removal of (site, unit) pairs at several sites at once (unit -> `values[site][unit]`, or 0)."""
    by_site: dict[str, list[int]] = {}
    for s, u in pairs:
        by_site.setdefault(s, []).append(u)
    with ExitStack() as stack:
        for s, us in by_site.items():
            vals = None if values is None else values[s][us]
            stack.enter_context(ablation_hook(handle, s, us, values=vals))
        yield


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

    grouped = group_by_site(pairs, factors)
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


def group_by_site(pairs: Sequence[tuple[str, int]], factors: Sequence[float] | None = None) -> dict[str, tuple[list[int], list[float]]]:
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
    for s, (us, fs) in group_by_site(pairs, factors).items():
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
    with assert_unchanged(model):
        plan = FoldPlan(model)
        plan_gates(plan, handle, resolved, units, factors, values)
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
        require_finite(self)
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
    from workbench.hooks import patch
    from workbench.progress import progress_bar
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
        for step in progress_bar(range(cfg.steps), desc="learning unit gates", enabled=progress, leave=False):
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

