"""The folding planner: a planned weight change equals the same change made at run time, and what has no
exact weight edit is refused with the reason."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from editors.folding import FoldPlan, NotFoldableError, canonical_kind, is_conv1d_hf, plan_gates, plan_units
from workbench.delta import WeightDelta
from workbench.fingerprint import model_fingerprint
from workbench.handle import ModelHandle
from workbench.hooks import edit
from workbench.sites import resolve_site


def _x(seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _runtime(handle: ModelHandle, site: str, units: Sequence[int], factors: Sequence[float],
             constants: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """The model's output with unit u of a CNN site set to f*a + c at run time."""
    idx = torch.tensor(list(units))
    f = torch.tensor(list(factors)).view(1, -1, 1, 1)
    c = torch.tensor(list(constants)).view(1, -1, 1, 1)

    def fn(act: torch.Tensor) -> torch.Tensor:
        act[:, idx] = act[:, idx] * f + c
        return act

    with torch.no_grad(), edit(handle, {site: fn}):
        return handle.model(x)


def _folded(handle: ModelHandle, plan: FoldPlan, x: torch.Tensor) -> torch.Tensor:
    delta = WeightDelta.from_model(handle.model, plan.changes, method="test")
    with torch.no_grad(), delta.applied(handle.model):
        return handle.model(x)


@pytest.mark.parametrize("site,side,factor,offset,used", [
    ("stem.relu", "auto", 0.0, (0.2, 0.4), "write"),     # BN gamma/beta through a ReLU
    ("layer1.relu1", "read", 0.5, None, "read"),          # conv2's input slice
    ("layer2.relu2", "write", 0.0, (0.1, 0.0), "write"),  # residual sum: bn2 and the projection shortcut's BN
    ("layer3.relu2", "read", 0.0, (0.3, 0.7), "read"),    # pool -> flatten -> fc, the constant goes into fc's bias
])
def test_planned_units_equal_the_runtime_change(resnet_handle: ModelHandle, site: str, side: str, factor: float,
                                                offset: tuple[float, ...] | None, used: str) -> None:
    h, x = resnet_handle, _x()
    before = model_fingerprint(h.model)
    plan = FoldPlan(h.model)
    got_side = plan_units(plan, h, resolve_site(h, site), torch.tensor([0, 2]), factor,
                          None if offset is None else torch.tensor(offset), side)  # type: ignore[arg-type]
    assert got_side == used and set(plan.touched) == set(plan.changes)
    assert model_fingerprint(h.model) == before  # planning never writes the weights
    want = _runtime(h, site, [0, 2], [factor, factor], offset or (0.0, 0.0), x)
    got = _folded(h, plan, x)
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(got, h.model(x), atol=1e-4)  # the change does something


def test_planned_gates_equal_the_runtime_gates(resnet_handle: ModelHandle) -> None:
    # gates act on the pre-activation: z -> f*z + (1-f)*c before the ReLU, written by the BatchNorm(s) behind it
    h, x = resnet_handle, _x(1)
    units, factors, constants = [1, 3], [0.3, 1.7], [0.2, 0.5]
    for site in ("stem.relu", "layer2.relu2"):
        plan = FoldPlan(h.model)
        plan_gates(plan, h, resolve_site(h, site), units, factors, constants)
        want = _runtime(h, f"{site}:input", units, factors, [(1 - f) * c for f, c in zip(factors, constants)], x)
        assert torch.allclose(_folded(h, plan, x), want, atol=1e-5), site


def test_refusals_say_why(resnet_handle: ModelHandle) -> None:
    h = resnet_handle
    # layer1's shortcut is the identity: its input also feeds conv1, so the write side cannot be edited alone
    with pytest.raises(NotFoldableError, match="feeds"):
        plan_units(FoldPlan(h.model), h, resolve_site(h, "layer1.relu2"), torch.tensor([1]), 0.0, None, "write")
    # and a constant cannot pass a padded conv exactly
    with pytest.raises(NotFoldableError, match="run-time hook"):
        plan_units(FoldPlan(h.model), h, resolve_site(h, "layer1.relu2"), torch.tensor([1]), 0.0, torch.tensor([0.5]))
    with pytest.raises(NotFoldableError, match="only a non-negative scale"):
        plan_units(FoldPlan(h.model), h, resolve_site(h, "stem.relu"), torch.tensor([1]), -1.0, None, "write")
    plan = FoldPlan(h.model)
    with pytest.raises(NotFoldableError, match="does not exist"):
        plan.scale("nope.weight", 0, torch.tensor([0]), 0.5)
    plan.scale("fc.weight", 0, torch.tensor([0]), 1.0)  # factor 1 changes nothing
    assert plan.changes == {} and plan.touched == []


def test_transformer_sites_fold_into_projections(load_tiny) -> None:
    h = load_tiny("gpt2")
    post = resolve_site(h, "blocks.1.mlp.hook_post")
    out = resolve_site(h, "blocks.1.mlp.hook_out")
    assert canonical_kind(post) == "mlp.hook_post" and canonical_kind(out) == "mlp.hook_out"
    assert canonical_kind(resolve_site(h, "blocks.1.hook_resid_post")) == "hook_resid_post"
    proj = h.model.get_submodule(post.module_path.rsplit(".", 1)[0] + ".c_proj")
    assert is_conv1d_hf(proj) and not is_conv1d_hf(nn.Linear(2, 2))
    plan = FoldPlan(h.model)
    assert plan_units(plan, h, post, torch.tensor([1, 7]), 0.0, None) == "read"  # MLP neurons: the output projection
    assert list(plan.changes) == [f"{post.module_path.rsplit('.', 1)[0]}.c_proj.weight"]
    plan = FoldPlan(h.model)
    assert plan_units(plan, h, out, torch.tensor([1]), 0.5, None) == "write"  # rows and bias of the projection
    with pytest.raises(NotFoldableError, match="residual stream"):
        plan_units(FoldPlan(h.model), h, resolve_site(h, "blocks.0.hook_resid_post"), torch.tensor([1]), 0.0, None)
