"""Unit ablation/scaling as weight edits: equal to the run-time change, bit-exact revert, clear refusals."""

from __future__ import annotations

import pytest
import torch

from editors.unit_ablation import NotFoldableError, UnitAblation, UnitRequest, ablation_hook, unit_delta
from workbench.errors import WorkbenchError
from workbench.fingerprint import model_fingerprint
from workbench.handle import Architecture, ImagePreprocess, ModelHandle
from workbench.zoo.shapesnet import ShapesNetConfig, build_model


@pytest.fixture
def resnet_handle() -> ModelHandle:
    """A small random ShapesNet (BatchNorm, residual blocks, identity and projection shortcuts)."""
    model = build_model(ShapesNetConfig(num_classes=4, channels=(4, 6, 8)), seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    pre = ImagePreprocess(height=16, width=16, class_names=tuple("abcd"))
    return ModelHandle(spec="test:resnet", model=model.eval(), kind="image_classifier",
                       arch=Architecture(family="cnn", n_layers=3), preprocess=pre)


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


@pytest.mark.slow
def test_trojan_surgery_style_trojan() -> None:
    import workbench as wb
    from editors.unit_ablation import trojan_surgery

    torch.set_num_threads(1)
    h = wb.load("zoo:shapesnet", device="cpu", progress=False)
    r = trojan_surgery(h, "style-universal", n_select=96, n_eval=200, n_clean=1000, n_random_draws=3,
                       sites=("layer2.relu1", "layer2.relu2", "layer3.relu1"), progress=False)
    assert r["asr_before"] > 0.9
    assert r["asr_after"] <= 0.1 * r["asr_before"]              # >= 90% relative cut
    assert r["clean_before"] - r["clean_after"] <= 0.01 + 1e-9   # <= 1 point on 1000 fresh scenes
    assert r["random_asr_after"] > 0.5                           # the same number of random units does not
    assert set(r) >= {"asr_before", "asr_after", "clean_before", "clean_after", "random_asr_after"}



@pytest.mark.slow
def test_greedy_surgery_spans_sites_and_beats_random_units() -> None:
    import workbench as wb
    from editors.unit_ablation import trojan_surgery
    from workbench.fingerprint import model_fingerprint

    torch.set_num_threads(1)
    h = wb.load("zoo:shapesnet", device="cpu", progress=False)
    before = model_fingerprint(h.model)
    r = trojan_surgery(h, "patch-universal", method="greedy", n_units=4, greedy_candidates=4, n_select=48, n_ref=160,
                       n_eval=128, n_clean=200, n_random_draws=2, curve_ks=(1, 4), progress=False)
    assert model_fingerprint(h.model) == before  # selecting and measuring leave the model as it was
    pairs = [tuple(p) for p in r["units"]]
    assert 1 <= len(pairs) <= 4 and r["site"] == "+".join(r["units_by_site"])
    assert [s["unit"] for s in r["selection"]["grid"]] == [u for _, u in pairs]  # one record per greedy step
    assert r["asr_after"] < 0.5 * r["asr_before"] and r["random_asr_after"] > 0.8  # selected units cut, random do not
    assert r["curve"][0]["k"] == 1 and r["curve"][-1]["asr"] <= r["curve"][0]["asr"]


def test_multi_site_delta_equals_runtime_removal_and_reverts(resnet_handle: ModelHandle) -> None:
    # units at several sites of one network, folded together (each fitted with the earlier ones applied)
    from editors.unit_ablation import _removed_pairs, multi_site_delta
    from workbench.fingerprint import model_fingerprint
    from workbench.unit_selection import unit_activations

    h = resnet_handle
    sites = ("stem.relu", "layer1.relu1", "layer2.relu2", "layer3.relu1")
    x = torch.rand((6, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    values = {s: unit_activations(h, s, x).mean(0) for s in sites}
    pairs = [("layer3.relu1", 1), ("stem.relu", 0), ("layer2.relu2", 2), ("layer1.relu1", 3), ("stem.relu", 2)]
    before = model_fingerprint(h.model)
    delta = multi_site_delta(h, pairs, values)
    assert model_fingerprint(h.model) == before
    with torch.no_grad():
        with _removed_pairs(h, pairs, values):
            want = h.model(x)
        with delta.applied(h.model):
            got = h.model(x)
    assert model_fingerprint(h.model) == before  # revert is bit-exact
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, h.model(x), atol=1e-4)  # and it did change something
