"""Hooks: capture shapes, bitwise no-ops, real patches, and removal on every exit path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import D_MODEL
from workbench.errors import UnknownSiteError, WorkbenchError
from workbench.hooks import Recorder, capture, edit, matching_sites, patch, run_with_cache
from workbench.models import dummy_input, run_model
from workbench.sites import Site, list_sites


def _logits(h, inputs) -> torch.Tensor:
    with torch.no_grad():
        return run_model(h.model, inputs).logits


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _canonical_names(h) -> list[str]:
    return [s.name for s in list_sites(h) if s.canonical]


def test_capture_all_canonical_sites_in_one_forward(tiny_lm) -> None:
    names = _canonical_names(tiny_lm)
    inputs = dummy_input(tiny_lm, batch_size=2)
    batch, seq = inputs["input_ids"].shape
    calls = []
    counter = tiny_lm.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad(), capture(tiny_lm, names) as acts:
            run_model(tiny_lm.model, inputs)
    finally:
        counter.remove()
    assert len(calls) == 1 and set(acts) == set(names)
    for name, act in acts.items():
        width = tiny_lm.arch.d_mlp if ".mlp.hook_p" in name else D_MODEL
        rows = (1, batch) if name == "hook_pos_embed" else (batch,)  # position embeddings broadcast over the batch
        assert act.shape[0] in rows and act.shape[1:] == (seq, width), name
    assert _no_hooks_left(tiny_lm.model)


def test_capture_clones_and_detaches(load_tiny) -> None:
    h = load_tiny("gpt2")
    inputs = dummy_input(h)
    with capture(h, "blocks.0.hook_resid_post") as kept, capture(h, "blocks.0.hook_resid_post", detach=False) as live:
        logits = run_model(h.model, inputs).logits
    assert not kept["blocks.0.hook_resid_post"].requires_grad
    act = live["blocks.0.hook_resid_post"]
    (grad,) = torch.autograd.grad(logits.sum(), act)
    assert grad.shape == act.shape and grad.abs().sum() > 0


@pytest.mark.parametrize("how", ["identity", "clone", "edit-noop", "positions"])
def test_noop_hooks_leave_logits_bitwise_equal(tiny_lm, how: str) -> None:
    inputs = dummy_input(tiny_lm, batch_size=2)
    before = _logits(tiny_lm, inputs)
    names = _canonical_names(tiny_lm)
    if how == "identity":
        ctx = patch(tiny_lm, {n: (lambda a: a) for n in names})
    elif how == "clone":
        ctx = patch(tiny_lm, {n: (lambda a: a.clone()) for n in names})
    elif how == "edit-noop":
        ctx = edit(tiny_lm, {n: (lambda a: None) for n in names})
    else:
        ctx = patch(tiny_lm, {n: (lambda a: a * 2.0) for n in names}, positions=[])  # no position selected
    with ctx:
        during = _logits(tiny_lm, inputs)
    assert torch.equal(before, during)
    assert _no_hooks_left(tiny_lm.model)


def test_patch_changes_output_and_respects_positions(tiny_lm) -> None:
    inputs = dummy_input(tiny_lm)
    before = _logits(tiny_lm, inputs)
    site = "blocks.0.hook_resid_post"
    with patch(tiny_lm, {site: torch.zeros(D_MODEL)}):
        zeroed = _logits(tiny_lm, inputs)
    assert not torch.allclose(before, zeroed)
    with patch(tiny_lm, {site: lambda a: a + 1.0}, positions=[3]):
        later = _logits(tiny_lm, inputs)
    assert not torch.allclose(before[:, 3:], later[:, 3:])
    if tiny_lm.kind == "causal_lm":  # earlier positions cannot see position 3
        assert torch.equal(before[:, :3], later[:, :3])


def test_activation_patching_transplants_a_run(tiny_lm) -> None:
    """Patching every position of resid_pre[0] with run B's makes run A produce B's logits."""
    a = dummy_input(tiny_lm, text="the capital of paris is rome")
    b = dummy_input(tiny_lm, text="the dog of berlin is blue")
    assert a["input_ids"].shape == b["input_ids"].shape and not torch.equal(a["input_ids"], b["input_ids"])
    with torch.no_grad(), capture(tiny_lm, "blocks.0.hook_resid_pre") as acts:
        run_model(tiny_lm.model, b)
    with patch(tiny_lm, {"blocks.0.hook_resid_pre": acts["blocks.0.hook_resid_pre"]}):
        transplanted = _logits(tiny_lm, a)
    torch.testing.assert_close(transplanted, _logits(tiny_lm, b))


def test_edit_in_place_equals_patch(load_tiny) -> None:
    h = load_tiny("llama")
    inputs = dummy_input(h)
    site = "blocks.1.mlp.hook_post"

    def zero_unit(act: torch.Tensor) -> None:
        act[..., 5] = 0.0

    with edit(h, {site: zero_unit}):
        edited = _logits(h, inputs)
    mask = torch.ones(h.arch.d_mlp)
    mask[5] = 0
    with patch(h, {site: lambda a: a * mask}):
        patched = _logits(h, inputs)
    assert torch.equal(edited, patched)
    assert not torch.equal(edited, _logits(h, inputs))


def test_bool_mask_positions_per_item(load_tiny) -> None:
    h = load_tiny("gpt2")
    inputs = dummy_input(h, batch_size=2)
    seq = inputs["input_ids"].shape[1]
    mask = torch.zeros(2, seq, dtype=torch.bool)
    mask[1, 2] = True  # only item 1, position 2
    before = _logits(h, inputs)
    with patch(h, {"hook_embed": torch.zeros(D_MODEL)}, positions=mask):
        after = _logits(h, inputs)
    assert torch.equal(before[0], after[0])
    assert torch.equal(before[1, :2], after[1, :2]) and not torch.equal(before[1, 2:], after[1, 2:])
    with pytest.raises(WorkbenchError, match="out of range"), patch(h, {"hook_embed": torch.zeros(D_MODEL)}, positions=[99]):
        _logits(h, inputs)
    assert _no_hooks_left(h.model)


@pytest.mark.parametrize("where", ["body", "hook", "registration"])
def test_hooks_removed_after_exception(tiny_lm, where: str) -> None:
    inputs = dummy_input(tiny_lm)
    names = _canonical_names(tiny_lm)
    if where == "body":
        with pytest.raises(RuntimeError, match="boom"):
            with capture(tiny_lm, names), patch(tiny_lm, {names[2]: lambda a: a}), edit(tiny_lm, {names[3]: lambda a: None}):
                run_model(tiny_lm.model, inputs)
                raise RuntimeError("boom")
    elif where == "hook":
        with pytest.raises(WorkbenchError, match="does not broadcast"):
            with capture(tiny_lm, names), patch(tiny_lm, {names[-1]: torch.zeros(3)}):
                run_model(tiny_lm.model, inputs)
    else:
        with pytest.raises(UnknownSiteError):
            with capture(tiny_lm, names[:3] + ["blocks.5.hook_nothing"]):
                pass
    assert _no_hooks_left(tiny_lm.model)
    assert torch.equal(_logits(tiny_lm, inputs), _logits(tiny_lm, inputs))


def test_stop_skips_the_rest_of_the_network(load_tiny) -> None:
    h = load_tiny("gpt_neox")
    final_calls = []
    tail = h.model.gpt_neox.final_layer_norm.register_forward_hook(lambda *_: final_calls.append(1))
    reached_end_of_block = False
    try:
        with capture(h, ["hook_embed", "blocks.0.hook_resid_post"], stop=True) as acts:
            run_model(h.model, dummy_input(h))
            reached_end_of_block = True
    finally:
        tail.remove()
    assert set(acts) == {"hook_embed", "blocks.0.hook_resid_post"}
    assert not final_calls and not reached_end_of_block
    assert _no_hooks_left(h.model)


def test_stop_of_outer_capture_passes_through_inner(load_tiny) -> None:
    h = load_tiny("gpt2")
    with capture(h, "blocks.0.hook_resid_pre", stop=True) as outer:
        with capture(h, "ln_final.hook_normalized") as inner:
            run_model(h.model, dummy_input(h))
    assert "blocks.0.hook_resid_pre" in outer and not inner
    assert _no_hooks_left(h.model)


def test_tuple_outputs_and_kwarg_inputs() -> None:
    class Inner(nn.Module):
        def forward(self, hidden_states: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, None]:
            return hidden_states * scale, None

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Inner()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(hidden_states=x, scale=2.0)[0]

    model = Outer()
    x = torch.arange(6.0).reshape(1, 3, 2)
    with capture(model, ["inner", "inner:input"]) as acts:
        y = model(x)
    assert torch.equal(acts["inner:input"], x) and torch.equal(acts["inner"], y)
    with patch(model, {"inner:input": torch.ones(1, 3, 2)}):
        assert torch.equal(model(x), torch.full((1, 3, 2), 2.0))
    with patch(model, {"inner": lambda a: -a}):
        assert torch.equal(model(x), -y)
    assert _no_hooks_left(model)


def test_cnn_capture_and_patch(cnn_handle) -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = cnn_handle.model
    with torch.no_grad():
        before = model(x)
        with capture(cnn_handle, ["features.3", "head:input"]) as acts:
            model(x)
        with patch(cnn_handle, {"features.4": lambda a: a}):
            same = model(x)
        with patch(cnn_handle, {"pool": torch.zeros(2, 16, 1, 1)}):
            bias_only = model(x)
    assert acts["features.3"].shape == (2, 16, 8, 8) and acts["head:input"].shape == (2, 16)
    assert torch.equal(before, same)
    assert torch.allclose(bias_only, model.head.bias.detach().expand(2, -1))
    assert _no_hooks_left(model)


# --- the persistent recorder ---------------------------------------------------------------

def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_recorder_records_every_pass_with_hooks_registered_once(load_tiny) -> None:
    h = load_tiny("gpt2")
    sites = ["hook_embed", "blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"]
    a = dummy_input(h, text="the capital of paris is rome")
    b = dummy_input(h, text="the dog of berlin is blue")
    expected = []
    for inputs in (a, b):
        with torch.no_grad(), capture(h, sites) as acts:
            run_model(h.model, inputs)
        expected.append(acts)
    with torch.no_grad(), Recorder(h, sites) as rec:
        assert _hook_count(h.model) == len(sites)
        out_a = rec.run(**a)
        first = rec.acts
        out_b = rec.run(**b)
        assert _hook_count(h.model) == len(sites)
        second = dict(rec.acts)
        h.model(**a)  # a plain call inside the block records too, into the current dict
        plain = rec.acts
    assert not rec.stopped and first is not plain
    for got, want in zip((first, second, plain), (*expected, expected[0])):
        assert set(got) == set(sites) and all(torch.equal(got[n], want[n]) for n in sites)
    assert torch.equal(out_a.logits, _logits(h, a)) and torch.equal(out_b.logits, _logits(h, b))
    assert _no_hooks_left(h.model)


def test_recorder_keeps_live_tensors_for_gradients(load_tiny) -> None:
    h = load_tiny("llama")
    site = "blocks.0.hook_resid_post"
    with Recorder(h, [site], detach=False, clone=False) as rec:
        for _ in range(2):
            logits = rec.run(**dummy_input(h)).logits
            (grad,) = torch.autograd.grad(logits.sum(), rec.acts[site])
            assert grad.shape == rec.acts[site].shape and grad.abs().sum() > 0


def test_recorder_stops_each_pass(load_tiny) -> None:
    h = load_tiny("gpt_neox")
    final_calls = []
    tail = h.model.gpt_neox.final_layer_norm.register_forward_hook(lambda *_: final_calls.append(1))
    sites = ["hook_embed", "blocks.0.hook_resid_post"]
    try:
        with torch.no_grad(), Recorder(h, sites, stop=True) as rec:
            for text in ("one two three", "four five six seven"):
                assert rec.run(**dummy_input(h, text=text)) is None
                assert rec.stopped and set(rec.acts) == set(sites)
                assert rec.acts["hook_embed"].shape[1] == len(h.tokenizer(text)["input_ids"])
            reached = True
    finally:
        tail.remove()
    assert reached and not final_calls
    assert _no_hooks_left(h.model)


def test_recorder_plain_call_with_stop_ends_the_block(load_tiny) -> None:
    h = load_tiny("gpt2")
    reached_end_of_block = False
    with torch.no_grad(), Recorder(h, "blocks.0.hook_resid_post", stop=True) as rec:
        h.model(**dummy_input(h))
        reached_end_of_block = True
    assert rec.stopped and not reached_end_of_block and set(rec.acts) == {"blocks.0.hook_resid_post"}
    assert _no_hooks_left(h.model)


@pytest.mark.parametrize("where", ["body", "hook", "run outside", "entered twice"])
def test_recorder_removed_after_exception(load_tiny, where: str) -> None:
    h = load_tiny("gpt2")
    inputs = dummy_input(h)
    before = _logits(h, inputs)
    rec = Recorder(h, _canonical_names(h), stop=True)
    if where == "body":
        with pytest.raises(RuntimeError, match="boom"), rec:
            rec.run(**inputs)
            raise RuntimeError("boom")
    elif where == "hook":
        with pytest.raises(WorkbenchError, match="does not broadcast"), rec, patch(h, {"hook_embed": torch.zeros(3)}):
            rec.run(**inputs)
    elif where == "run outside":
        with pytest.raises(WorkbenchError, match="entered"):
            rec.run(**inputs)
    else:
        with pytest.raises(WorkbenchError, match="already entered"), rec, rec:
            pass
    assert _no_hooks_left(h.model)
    assert torch.equal(_logits(h, inputs), before)
    with rec:  # usable again after the failure
        assert rec.run(**inputs) is None and rec.stopped
    assert _no_hooks_left(h.model)


def test_run_with_cache(cnn_handle) -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, acts = run_with_cache(cnn_handle, x, ["features.3", "head:input"])
        assert torch.equal(out, cnn_handle.model(x))
        assert acts["features.3"].shape == (2, 16, 8, 8) and acts["head:input"].shape == (2, 16)
        cut, first = run_with_cache(cnn_handle, x, ["features.0"], stop=True)
    assert cut is None and set(first) == {"features.0"}
    assert _no_hooks_left(cnn_handle.model)


# --- names filters and site-aware callbacks -----------------------------------------------------

def test_capture_with_a_names_filter(tiny_lm) -> None:
    resid = [n for n in _canonical_names(tiny_lm) if n.endswith("hook_resid_post")]
    assert len(resid) == tiny_lm.arch.n_layers
    inputs = dummy_input(tiny_lm)
    with torch.no_grad(), capture(tiny_lm, lambda name: name.endswith("hook_resid_post")) as by_filter:
        run_model(tiny_lm.model, inputs)
    with torch.no_grad(), capture(tiny_lm, resid) as by_list:
        run_model(tiny_lm.model, inputs)
    assert list(by_filter) == list(by_list) and all(torch.equal(by_filter[n], by_list[n]) for n in resid)
    assert [s.name for s in matching_sites(tiny_lm, lambda name: name.endswith("hook_resid_post"))] == resid
    with pytest.raises(WorkbenchError, match="no site name passes"):
        capture(tiny_lm, lambda name: name == "no such site").__enter__()
    assert _no_hooks_left(tiny_lm.model)


def test_names_filter_sees_module_names(cnn_handle) -> None:
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad(), capture(cnn_handle, lambda name: name.startswith("features.")) as acts:
        cnn_handle.model(x)
    assert list(acts) == [f"features.{i}" for i in range(6)]


def test_site_aware_patch_serves_many_sites(tiny_lm) -> None:
    inputs = dummy_input(tiny_lm, batch_size=2)
    before = _logits(tiny_lm, inputs)
    names = _canonical_names(tiny_lm)
    seen: list[Site] = []

    def spy(act: torch.Tensor, *, site: Site) -> torch.Tensor:
        seen.append(site)
        return act

    with patch(tiny_lm, dict.fromkeys(names, spy)):
        during = _logits(tiny_lm, inputs)
    assert torch.equal(before, during)  # a site-aware no-op is still bitwise
    assert {s.name for s in seen} == set(names) and all(isinstance(s, Site) for s in seen)

    resid = matching_sites(tiny_lm, lambda name: name.endswith("hook_resid_post"))

    def by_layer(act: torch.Tensor, site: Site | None = None) -> torch.Tensor:
        return act * (1.0 + 0.1 * site.layer)

    with patch(tiny_lm, dict.fromkeys(resid, by_layer)):
        shared = _logits(tiny_lm, inputs)
    one_each = {s.name: (lambda a, k=1.0 + 0.1 * s.layer: a * k) for s in resid}
    with patch(tiny_lm, one_each):
        separate = _logits(tiny_lm, inputs)
    assert torch.equal(shared, separate) and not torch.equal(shared, before)
    assert _no_hooks_left(tiny_lm.model)


def test_site_aware_edit(load_tiny) -> None:
    h = load_tiny("llama")
    inputs = dummy_input(h)
    sites = ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]

    def zero_own_layer_unit(act: torch.Tensor, *, site: Site) -> None:
        act[..., site.layer] = 0.0

    with edit(h, dict.fromkeys(sites, zero_own_layer_unit)):
        shared = _logits(h, inputs)

    def zero(unit: int):
        def fn(act: torch.Tensor) -> None:
            act[..., unit] = 0.0

        return fn

    with edit(h, {sites[0]: zero(0), sites[1]: zero(1)}):
        separate = _logits(h, inputs)
    assert torch.equal(shared, separate) and not torch.equal(shared, _logits(h, inputs))
    assert _no_hooks_left(h.model)
