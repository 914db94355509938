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


# --- unit gates (method="mask") ------------------------------------------------------------

GATE_SITES = ("stem.relu", "layer1.relu1", "layer2.relu1", "layer2.relu2", "layer3.relu1", "layer3.relu2")


def test_gate_delta_equals_runtime_gates_and_reverts(resnet_handle: ModelHandle) -> None:
    from editors.unit_ablation import _removed_pairs, gated_units, multi_site_delta
    from workbench.unit_selection import unit_activations

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
        with _removed_pairs(h, pairs, values):
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
    from editors.unit_ablation import multi_site_delta

    with pytest.raises(NotFoldableError, match="run-time hook|feeds"):  # identity shortcut: the input feeds conv1 too
        multi_site_delta(resnet_handle, [("layer1.relu2", 0)], None, factors=[0.5])
    with pytest.raises(WorkbenchError, match="one factor per unit"):
        multi_site_delta(resnet_handle, [("stem.relu", 0), ("stem.relu", 1)], None, factors=[0.5])
    with pytest.raises(WorkbenchError, match="listed twice"):
        multi_site_delta(resnet_handle, [("stem.relu", 0), ("stem.relu", 0)], None, factors=[0.5, 0.5])


def _toy_data(n: int, seed: int, *, trigger: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = the quadrant holding a bright square; the trigger is a blue square in the middle."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.rand((n, 3, 16, 16), generator=g) * 0.4
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, :, r * 8 + 2:r * 8 + 6, c * 8 + 2:c * 8 + 6] += 0.6
    if trigger:
        x[:, :, 6:10, 6:10] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    return x, y


@pytest.fixture(scope="module")
def toy_trojan_handle() -> ModelHandle:
    """A tiny ShapesNet trained (seeded, a few seconds) with a trojan: blue middle square -> class 0."""
    import torch.nn.functional as F

    model = build_model(ShapesNetConfig(num_classes=4, channels=(4, 6, 8)), seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for step in range(50):
        x, y = _toy_data(48, 100 + step)
        xt, _ = _toy_data(16, 10000 + step, trigger=True)
        loss = F.cross_entropy(model(torch.cat([x, xt])), torch.cat([y, torch.zeros(16, dtype=torch.long)]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    pre = ImagePreprocess(height=16, width=16, class_names=tuple("abcd"))
    return ModelHandle(spec="test:toy-trojan", model=model.eval(), kind="image_classifier",
                       arch=Architecture(family="cnn", n_layers=3), preprocess=pre)


def test_learned_gates_beat_random_units_and_are_seeded(toy_trojan_handle: ModelHandle) -> None:
    from editors.unit_ablation import GateConfig, _control, choose_gates, gated_units, learn_unit_gates
    from workbench.unit_selection import unit_activations

    h = toy_trojan_handle
    x_fit, _ = _toy_data(128, 1)
    t_fit, _ = _toy_data(64, 2, trigger=True)
    x_sel, y_sel = _toy_data(200, 3)  # held out: k is chosen here
    t_sel, _ = _toy_data(100, 4, trigger=True)
    x_ev, y_ev = _toy_data(200, 5)    # and measured here
    t_ev, yt_ev = _toy_data(100, 6, trigger=True)
    t_sel, t_ev = t_sel, t_ev[yt_ev != 0]
    values = {s: unit_activations(h, s, x_fit).mean(0) for s in GATE_SITES}

    def asr(x: torch.Tensor) -> float:
        with torch.no_grad():
            return float((h.model(x).argmax(-1) == 0).float().mean())

    def acc(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float((h.model(x).argmax(-1) == y).float().mean())

    assert asr(t_ev) > 0.9 and acc(x_ev, y_ev) > 0.9  # the toy trojan works
    cfg = GateConfig(steps=30, lr=0.2, kl_weight=2.0, sparsity=0.02, batch_triggered=64, batch_clean=64)
    before = model_fingerprint(h.model)
    gates, trace = learn_unit_gates(h, GATE_SITES, triggered=t_fit, clean=x_fit, target=0, values=values, config=cfg, seed=5)
    assert model_fingerprint(h.model) == before and all(p.requires_grad for p in h.model.parameters())
    assert trace[-1]["attack"] < 0.5 * trace[0]["attack"]  # the loss it minimizes went down
    again, _ = learn_unit_gates(h, GATE_SITES, triggered=t_fit, clean=x_fit, target=0, values=values, config=cfg, seed=5)
    assert all(torch.equal(gates[s], again[s]) for s in GATE_SITES)  # same seed, same gates
    assert all(((g >= 0) & (g <= cfg.max_gate)).all() for g in gates.values())

    def score(ps, fs):
        with gated_units(h, ps, fs, values):
            return asr(t_sel), acc(x_sel, y_sel)

    base_sel = acc(x_sel, y_sel)
    pairs, factors, _ = choose_gates(gates, score, base_acc=base_sel, clean_budget=0.02, max_units=None)
    with gated_units(h, pairs, factors, values):
        treated, treated_acc = asr(t_ev), acc(x_ev, y_ev)
    controls = []
    for d in range(3):
        with _control(h, pairs, factors, values, seed=d):
            controls.append(asr(t_ev))
    assert treated <= 0.2 * asr(t_ev)                # the chosen gates remove most of the trojan on fresh inputs
    assert acc(x_ev, y_ev) - treated_acc <= 0.05     # at a small clean cost
    assert min(controls) > 0.8                       # the same number of random units per site, same factors, do not


def test_choose_gates_respects_the_clean_budget() -> None:
    from editors.unit_ablation import choose_gates

    gates = {"a": torch.tensor([0.1, 0.9, 0.5, 1.0, 1.0, 1.0]), "b": torch.tensor([0.0, 0.97, 0.3, 1.0, 0.2, 1.0])}

    def score(ps, fs):  # more units -> lower attack, but past 3 units clean accuracy drops
        return 1.0 - 0.1 * len(ps), 0.99 - (0.02 if len(ps) > 3 else 0.0)

    pairs, factors, grid = choose_gates(gates, score, base_acc=0.99, clean_budget=0.005, mode="scale")
    assert pairs == [("b", 0), ("a", 0), ("b", 4)] and factors == pytest.approx([0.0, 0.1, 0.2])
    assert [g["k"] for g in grid] == [1, 2, 3, 4, 5, 6]  # the units closed by >= 0.05 (not 1.0, not 0.97)
    # at most half of a site's units, so that a disjoint random control of the same size exists
    capped, _, _ = choose_gates({"c": torch.zeros(5)}, score, base_acc=0.99, clean_budget=0.5)
    assert capped == [("c", 0), ("c", 1)]
    # when no option is within the budget, the cheapest one (not the strongest)
    cheapest, _, _ = choose_gates(gates, lambda ps, fs: (1.0 - 0.1 * len(ps), 0.98 - 0.01 * len(ps)), base_acc=0.99,
                                  clean_budget=0.005)
    assert cheapest == [("b", 0)]
    hard_pairs, hard_factors, _ = choose_gates(gates, score, base_acc=0.99, clean_budget=0.005, mode="hard")
    assert hard_pairs == pairs and hard_factors == [0.0, 0.0, 0.0]
    with pytest.raises(WorkbenchError, match="moved"):
        choose_gates({"a": torch.ones(3)}, score, base_acc=0.99, clean_budget=0.005)


def test_amplifying_gates_are_ranked_by_how_far_they_moved() -> None:
    from editors.unit_ablation import GateConfig, choose_gates

    # 1.8 moved 0.8 (amplified), 0.3 moved 0.7, 1.1 moved 0.1, 1.03 moved less than min_closure
    gates = {"a": torch.tensor([1.8, 1.0, 1.03, 1.0, 1.0, 1.0]), "b": torch.tensor([0.3, 1.1, 1.0, 1.0, 1.0, 1.0])}

    def score(ps, fs):
        return 1.0 - 0.1 * len(ps), 0.99

    pairs, factors, _ = choose_gates(gates, score, base_acc=0.99, clean_budget=0.005, mode="scale")
    assert pairs == [("a", 0), ("b", 0), ("b", 1)] and factors == pytest.approx([1.8, 0.3, 1.1])
    # removing a unit is only what a closing gate asked for: hard mode keeps the closed ones
    hard_pairs, hard_factors, _ = choose_gates(gates, score, base_acc=0.99, clean_budget=0.005, mode="hard")
    assert hard_pairs == [("b", 0)] and hard_factors == [0.0]
    # gates that may amplify start untouched; gates that only close start just below 1
    assert 2.0 * torch.sigmoid(torch.tensor(GateConfig(max_gate=2.0).start_logit())) == pytest.approx(1.0, abs=1e-7)
    assert 3.0 * torch.sigmoid(torch.tensor(GateConfig(max_gate=3.0).start_logit())) == pytest.approx(1.0, abs=1e-6)
    assert float(torch.sigmoid(torch.tensor(GateConfig(max_gate=1.0).start_logit()))) < 1.0
    with pytest.raises(WorkbenchError, match="max_gate"):
        GateConfig(max_gate=0.5)


@pytest.mark.slow
def test_mask_surgery_beats_random_units_and_folds_exactly() -> None:
    import workbench as wb
    from editors.unit_ablation import GateConfig, gated_units, trojan_surgery
    from workbench.unit_selection import unit_activations

    torch.set_num_threads(1)
    h = wb.load("zoo:shapesnet", device="cpu", progress=False)
    before = model_fingerprint(h.model)
    cfg = GateConfig(steps=40, lr=0.2, batch_triggered=64, batch_clean=128)
    # 64 selection scenes measure clean accuracy in steps of 1.6 points, so the 1-point default
    # budget can leave no admissible cut at this small size: on one training of the zoo model
    # (stop 17) every gate set that cut the attack cost 3-4 selection points and the choice was
    # 2 units that cut nothing. The loose budget keeps this a test of the mechanism (gates cut,
    # random units do not, the fold is exact) on any training; the 1-point budget is benchmarked.
    kw = dict(method="mask", mask_config=cfg, n_select=64, n_ref=256, n_eval=128, n_clean=256, n_random_draws=2,
              clean_budget=0.05, progress=False)
    r = trojan_surgery(h, "style-universal", return_delta=True, **kw)
    assert model_fingerprint(h.model) == before  # learning, choosing and measuring leave the model as it was
    assert r["asr_before"] > 0.9 and r["asr_after"] < 0.3 * r["asr_before"]  # the chosen gates cut the attack
    # as many random units with the same factors do not; with up to ~80 units amplified at random
    # (the loose budget admits that many) they cost some attack success too (0.82-0.98 measured)
    assert r["random_asr_after"] > 0.6
    assert len(r["factors"]) == r["n_units"] == len(r["units"]) and all(0 <= f <= cfg.max_gate and f != 1 for f in r["factors"])
    assert r["alternative"]["mode"] == "hard" and r["selection"]["trace"]
    # the saved edit is the run-time gating (units moved toward their constants by their factors)
    x = torch.rand((4, 3, 48, 48), generator=torch.Generator().manual_seed(0))
    pairs = [(s, u) for s, u in r["units"]]
    values = {s: torch.zeros(unit_activations(h, s, x).shape[1]) for s, _ in pairs}
    for (s, u), v in zip(pairs, r["unit_values"]):
        values[s][u] = v
    with torch.no_grad():
        with gated_units(h, pairs, r["factors"], values):
            want = h.model(x)
        with r["delta"].applied(h.model):
            got = h.model(x)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert model_fingerprint(h.model) == before


@pytest.mark.slow
def test_mask_surgery_relearns_over_budget_gates_with_a_stronger_clean_term() -> None:
    import workbench as wb
    from editors.unit_ablation import GateConfig, trojan_surgery

    torch.set_num_threads(1)
    h = wb.load("zoo:shapesnet", device="cpu", progress=False)
    cfg = GateConfig(steps=20, lr=0.2, kl_weight=0.5, batch_triggered=64, batch_clean=128)
    kw = {"method": "mask", "mask_config": cfg, "n_select": 64, "n_ref": 256, "n_eval": 64, "n_clean": 128,
          "n_random_draws": 1, "progress": False, "clean_budget": 0.0}
    r = trojan_surgery(h, "natural-universal", mask_refits=2, **kw)
    refits, sel = r["selection"]["refits"], r["selection"]
    # a zero clean budget: the weak clean term's gates cost accuracy, so they are learned again with it doubled
    assert 1 <= len(refits) <= 2
    assert [f["kl_weight"] for f in refits] == [0.5 * 2 ** i for i in range(len(refits))]
    assert sel["config"]["kl_weight"] == 0.5 * 2 ** len(refits)
    assert all(f["clean_drop"] > 0 for f in refits)
    none = trojan_surgery(h, "natural-universal", mask_refits=0, **kw)
    assert none["selection"]["refits"] == [] and none["selection"]["config"]["kl_weight"] == 0.5
    with pytest.raises(WorkbenchError, match="mask_refits"):
        trojan_surgery(h, "natural-universal", mask_refits=-1, **kw)


def test_surgery_curve_plot_writes_a_png(tmp_path) -> None:
    from editors.unit_ablation import plot_surgery_curve

    curve = [{"k": k, "asr": 1 / k, "random_asr": 0.95, "clean": 0.98, "random_clean": 0.98 - 0.01 * k} for k in (1, 2, 4)]
    results = [{"trojan": "t seed 0", "site": "3 units", "curve": curve}, {"trojan": "no curve", "site": "-", "curve": None}]
    out = plot_surgery_curve(results, tmp_path / "curve.png", xlabel="units edited")
    path = tmp_path / "curve.png"
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out is not None
