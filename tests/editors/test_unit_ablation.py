"""Unit ablation/scaling and unit gates as weight edits: equal to the run-time change, bit-exact revert,
clear refusals."""

from __future__ import annotations

import pytest
import torch

from editors.unit_ablation import (
    GateConfig,
    NotFoldableError,
    UnitAblation,
    UnitRequest,
    ablation_hook,
    gated_units,
    learn_unit_gates,
    multi_site_delta,
    removed_units,
    unit_delta,
)
from workbench.errors import WorkbenchError
from workbench.fingerprint import model_fingerprint
from workbench.handle import ModelHandle
from workbench.unit_selection import unit_activations


def _out(handle: ModelHandle, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = handle.model(**x) if isinstance(x, dict) else handle.model(x)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state if hasattr(out, "last_hidden_state") else out).float()


@pytest.mark.parametrize("site,side,values", [
    ("stem.relu", "write", (0.2, 0.4)),       # BN gamma/beta through a ReLU
    ("layer1.relu1", "read", None),           # conv2's input slice
    ("layer2.relu2", "write", (0.1, 0.0)),    # residual sum: bn2 and the projection shortcut's BN
    ("layer2.relu2", "read", None),           # next block's conv1 and shortcut conv
    ("layer3.relu2", "read", (0.3, 0.7)),     # pool -> flatten -> fc, the constant goes into fc's bias
    ("layer3.bn1", "write", None),
])
def test_cnn_weight_edit_equals_runtime_edit(resnet_handle: ModelHandle, site: str, side: str, values) -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = model_fingerprint(resnet_handle.model)
    base = _out(resnet_handle, x)
    delta = unit_delta(resnet_handle, UnitRequest(site, (0, 2), values), side=side)  # type: ignore[arg-type]
    assert model_fingerprint(resnet_handle.model) == before  # fitting leaves the model alone
    with ablation_hook(resnet_handle, site, [0, 2], values=values):
        want = _out(resnet_handle, x)
    with delta.applied(resnet_handle.model):
        got = _out(resnet_handle, x)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-4)  # the edit does something
    assert model_fingerprint(resnet_handle.model) == before  # bit-exact revert


def test_cnn_refusals_explain_and_offer_the_hook(resnet_handle: ModelHandle) -> None:
    # layer1's shortcut is the identity: its input also feeds conv1, and a constant cannot pass padded convs exactly
    with pytest.raises(NotFoldableError, match="run-time hook"):
        unit_delta(resnet_handle, UnitRequest("layer1.relu2", (1,), (0.5,)))
    with pytest.raises(WorkbenchError, match="out of range"):
        unit_delta(resnet_handle, UnitRequest("layer2.relu2", (0, 6)))
    with pytest.raises(WorkbenchError, match="no units"):
        unit_delta(resnet_handle, UnitRequest("layer2.relu2", ()))


def test_scaling_small_cnn(cnn_handle: ModelHandle) -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    delta = UnitAblation(factor=2.0).fit(cnn_handle, {"site": "features.4", "units": [3, 5]})
    with ablation_hook(cnn_handle, "features.4", [3, 5], factor=2.0):
        want = _out(cnn_handle, x)
    with delta.applied(cnn_handle.model):
        assert torch.allclose(_out(cnn_handle, x), want, atol=1e-5)


@pytest.mark.parametrize("family,other", [("gpt2", "blocks.0.mlp.hook_pre"), ("gpt_neox", "blocks.0.mlp.hook_out"),
                                          ("llama", "blocks.1.attn.hook_out"), ("bert", "blocks.0.mlp.hook_out")])
def test_transformer_neurons_all_families(load_tiny, family: str, other: str, tmp_path) -> None:
    h = load_tiny(family)
    enc = {k: v for k, v in h.tokenizer(["the cat is red", "the quick brown fox"], return_tensors="pt", padding=True).items()
           if k in ("input_ids", "attention_mask", "token_type_ids")}
    before = model_fingerprint(h.model)
    for site in ("blocks.1.mlp.hook_post", other):
        delta = UnitAblation(verify=False).fit(h, UnitRequest(site, (1, 7)))
        with ablation_hook(h, site, [1, 7]):
            want = _out(h, enc)
        with delta.applied(h.model):
            got = _out(h, enc)
        assert torch.allclose(got, want, atol=1e-5), site
        assert model_fingerprint(h.model) == before
    path = delta.save(tmp_path / "d.delta")
    assert path.exists()
    with pytest.raises(NotFoldableError, match="residual stream"):
        unit_delta(h, UnitRequest("blocks.0.hook_resid_post", (1,)))
    with ablation_hook(h, "blocks.0.hook_resid_post", [1]):  # the offered alternative works
        _out(h, enc)


def test_multi_site_delta_equals_runtime_removal_and_reverts(resnet_handle: ModelHandle) -> None:
    # units at several sites of one network, folded together (each fitted with the earlier ones applied)
    h = resnet_handle
    sites = ("stem.relu", "layer1.relu1", "layer2.relu2", "layer3.relu1")
    x = torch.rand((6, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    values = {s: unit_activations(h, s, x).mean(0) for s in sites}
    pairs = [("layer3.relu1", 1), ("stem.relu", 0), ("layer2.relu2", 2), ("layer1.relu1", 3), ("stem.relu", 2)]
    before = model_fingerprint(h.model)
    delta = multi_site_delta(h, pairs, values)
    assert model_fingerprint(h.model) == before
    with torch.no_grad():
        with removed_units(h, pairs, values):
            want = h.model(x)
        with delta.applied(h.model):
            got = h.model(x)
    assert model_fingerprint(h.model) == before  # revert is bit-exact
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, h.model(x), atol=1e-4)  # and it did change something


# --- unit gates (method="mask") ------------------------------------------------------------

GATE_SITES = ("stem.relu", "layer1.relu1", "layer2.relu1", "layer2.relu2", "layer3.relu1", "layer3.relu2")


def test_gate_delta_equals_runtime_gates_and_reverts(resnet_handle: ModelHandle) -> None:
    h = resnet_handle
    x = torch.rand((6, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    values = {s: unit_activations(h, s, x).mean(0) for s in GATE_SITES}
    pairs = [("layer3.relu2", 1), ("stem.relu", 0), ("layer2.relu2", 2), ("layer1.relu1", 3), ("stem.relu", 2), ("layer2.relu1", 5)]
    factors = [0.3, 0.0, 0.55, 0.9, 0.25, 0.7]
    before = model_fingerprint(h.model)
    delta = multi_site_delta(h, pairs, values, factors=factors)
    assert model_fingerprint(h.model) == before  # fitting leaves the model alone
    with torch.no_grad():
        base = h.model(x)
        with gated_units(h, pairs, factors, values):
            want = h.model(x)
        with delta.applied(h.model):
            got = h.model(x)
        assert model_fingerprint(h.model) == before  # bit-exact revert
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(got, base, atol=1e-4)
        # a closed gate (factor 0) is mean ablation, folded or at run time
        hard = multi_site_delta(h, pairs, values, factors=[0.0] * len(pairs))
        with removed_units(h, pairs, values):
            want_hard = h.model(x)
        with hard.applied(h.model):
            assert torch.allclose(h.model(x), want_hard, atol=1e-5, rtol=1e-4)
        # an open gate (factor 1) changes nothing
        with gated_units(h, pairs, [1.0] * len(pairs), values):
            assert torch.equal(h.model(x), base)
        # an amplifying gate (factor > 1: the unit's deviation from its mean scaled up) folds exactly too
        amp_factors = [1.8, 0.0, 1.3, 2.0, 0.25, 1.5]
        amp = multi_site_delta(h, pairs, values, factors=amp_factors)
        with gated_units(h, pairs, amp_factors, values):
            want_amp = h.model(x)
        with amp.applied(h.model):
            assert torch.allclose(h.model(x), want_amp, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(want_amp, want, atol=1e-4)
    assert model_fingerprint(h.model) == before


def test_gate_refusals(resnet_handle: ModelHandle) -> None:
    with pytest.raises(NotFoldableError, match="run-time hook|feeds"):  # identity shortcut: the input feeds conv1 too
        multi_site_delta(resnet_handle, [("layer1.relu2", 0)], None, factors=[0.5])
    with pytest.raises(WorkbenchError, match="one factor per unit"):
        multi_site_delta(resnet_handle, [("stem.relu", 0), ("stem.relu", 1)], None, factors=[0.5])
    with pytest.raises(WorkbenchError, match="listed twice"):
        multi_site_delta(resnet_handle, [("stem.relu", 0), ("stem.relu", 0)], None, factors=[0.5, 0.5])


def test_learned_gates_are_seeded_and_leave_the_model_alone(resnet_handle: ModelHandle) -> None:
    h = resnet_handle
    clean = torch.rand((32, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    triggered = clean.clone()
    triggered[:, 2, 6:10, 6:10] = 1.0
    values = {s: unit_activations(h, s, clean).mean(0) for s in GATE_SITES}
    cfg = GateConfig(steps=12, lr=0.2, batch_triggered=16, batch_clean=16)
    before = model_fingerprint(h.model)
    gates, trace = learn_unit_gates(h, GATE_SITES, triggered=triggered, clean=clean, target=1, values=values, config=cfg,
                                    seed=5)
    assert model_fingerprint(h.model) == before and all(p.requires_grad for p in h.model.parameters())
    assert set(gates) == set(GATE_SITES) and all(len(gates[s]) == len(values[s]) for s in GATE_SITES)
    assert all(((g >= 0) & (g <= cfg.max_gate)).all() for g in gates.values())
    assert [t["step"] for t in trace] == [0, 10, 11]  # every 10th step and the last
    again, _ = learn_unit_gates(h, GATE_SITES, triggered=triggered, clean=clean, target=1, values=values, config=cfg,
                                seed=5)
    assert all(torch.equal(gates[s], again[s]) for s in GATE_SITES)  # same seed, same gates


def test_gate_config_refuses_bad_values() -> None:
    # gates that may amplify start untouched; gates that only close start just below 1
    assert 2.0 * torch.sigmoid(torch.tensor(GateConfig(max_gate=2.0).start_logit())) == pytest.approx(1.0, abs=1e-7)
    assert 3.0 * torch.sigmoid(torch.tensor(GateConfig(max_gate=3.0).start_logit())) == pytest.approx(1.0, abs=1e-6)
    assert float(torch.sigmoid(torch.tensor(GateConfig(max_gate=1.0).start_logit()))) < 1.0
    with pytest.raises(WorkbenchError, match="max_gate"):
        GateConfig(max_gate=0.5)
    with pytest.raises(WorkbenchError, match="steps and batch sizes"):
        GateConfig(steps=0)
