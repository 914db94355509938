"""WeightDelta: bit-exact revert, fingerprint refusal, safe files, sequential edits."""

from __future__ import annotations

import contextlib
import logging
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from workbench.delta import (
    CHECK_EDITED,
    CHECK_STATE,
    LowRank,
    ModelChangedError,
    WeightDelta,
    assert_unchanged,
    changes_added,
    compose_on,
)
from workbench.errors import CorruptFileError, FingerprintMismatchError, UnsafeFileError, WorkbenchError
from workbench.fingerprint import model_fingerprint, parameter_fingerprint

GPT2_PARAM = "transformer.h.0.mlp.c_proj.weight"  # Conv1D: (4 * n_embd, n_embd)


def tiny_gpt2(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16, bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval().to(dtype)


def tiny_mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).to(dtype)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_equal(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert after[k].dtype == before[k].dtype
        assert torch.equal(after[k], before[k]), k


def make_delta(model: nn.Module, kind: str, *, seed: int = 1) -> WeightDelta:
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, GPT2LMHeadModel):
        name, other = GPT2_PARAM, "transformer.h.1.ln_2.bias"
    else:
        name, other = "0.weight", "2.bias"
    shape = dict(model.named_parameters())[name].shape
    if kind == "dense":
        main: object = torch.randn(shape, generator=g) * 0.1
    else:
        main = (torch.randn(shape[0], 2, generator=g), torch.randn(shape[1], 2, generator=g) * 0.1)
    other_shape = dict(model.named_parameters())[other].shape
    changes = {name: main, other: torch.randn(other_shape, generator=g) * 0.1}
    return WeightDelta.from_model(model, changes, method="test", request={"kind": kind})


MODELS = {"mlp": tiny_mlp, "gpt2": tiny_gpt2}


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("kind", ["dense", "low_rank"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_apply_changes_touched_params_and_revert_is_bit_exact(arch: str, kind: str, dtype: torch.dtype) -> None:
    model = MODELS[arch](dtype)
    before, fp = snapshot(model), model_fingerprint(model)
    param_ids = {n: id(p) for n, p in model.named_parameters()}
    delta = make_delta(model, kind)
    delta.apply(model)
    after = model.state_dict()
    for name in before:
        touched = name in delta.changes
        assert torch.equal(after[name], before[name]) != touched, name
    expected = before[delta.names[0]].double() + delta.dense(delta.names[0]).double()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(after[delta.names[0]].double(), expected, atol=tol * 10, rtol=tol)
    delta.revert(model)
    assert_bit_equal(model, before)
    assert model_fingerprint(model) == fp
    assert {n: id(p) for n, p in model.named_parameters()} == param_ids  # same Parameter objects


@pytest.mark.parametrize("kind", ["dense", "low_rank"])
def test_applied_context_reverts_after_exception(kind: str) -> None:
    model = tiny_gpt2()
    before, fp = snapshot(model), model_fingerprint(model)
    delta = make_delta(model, kind)
    with pytest.raises(RuntimeError, match="boom"):
        with delta.applied(model) as m:
            assert m is model
            assert not torch.equal(model.state_dict()[GPT2_PARAM], before[GPT2_PARAM])
            raise RuntimeError("boom")
    assert_bit_equal(model, before)
    assert model_fingerprint(model) == fp
    assert not delta.is_applied(model)
    with delta.applied(model):  # usable again after the failure
        pass
    assert_bit_equal(model, before)


def test_applied_context_changes_outputs_inside_only() -> None:
    model = tiny_gpt2()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        base = model(ids).logits
        with make_delta(model, "low_rank").applied(model):
            edited = model(ids).logits
        again = model(ids).logits
    assert not torch.equal(base, edited)
    assert torch.equal(base, again)


def test_fingerprint_mismatch_is_refused_and_model_untouched() -> None:
    model = tiny_mlp()
    delta = make_delta(model, "dense")
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-3
    before = snapshot(model)
    with pytest.raises(FingerprintMismatchError, match="fingerprint") as info:
        delta.apply(model)
    assert "fitted on" in str(info.value)
    assert_bit_equal(model, before)


GPT2_OTHER = "transformer.h.0.mlp.c_fc.weight"  # the MLP weight a layer-0 c_proj edit is computed through


def test_changed_unedited_weight_is_refused_with_a_clear_message() -> None:
    model = tiny_gpt2()
    delta = WeightDelta.from_model(model, {GPT2_PARAM: (torch.ones(128, 1), torch.ones(32, 1))}, method="rome")
    assert delta.checked == (CHECK_EDITED, CHECK_STATE)
    original = dict(model.named_parameters())[GPT2_OTHER].detach().clone()
    with torch.no_grad():
        dict(model.named_parameters())[GPT2_OTHER].mul_(1.5)
    before = snapshot(model)
    with pytest.raises(FingerprintMismatchError) as info:
        delta.apply(model)
    message = str(info.value)
    assert "fitted on another model" in message
    assert f"weight(s) {GPT2_PARAM} match but other parameters or buffers differ" in message
    assert_bit_equal(model, before)
    assert not delta.is_applied(model)
    with torch.no_grad():
        dict(model.named_parameters())[GPT2_OTHER].copy_(original)
    restored = snapshot(model)
    with delta.applied(model):  # the model it was fitted on again: applies cleanly
        assert not torch.equal(model.state_dict()[GPT2_PARAM], restored[GPT2_PARAM])
    assert_bit_equal(model, restored)


def test_changed_buffer_is_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    delta = WeightDelta.from_model(model, {"0.bias": torch.ones(3)}, method="test")
    model[1].running_mean.add_(1.0)
    with pytest.raises(FingerprintMismatchError, match="other parameters or buffers differ"):
        delta.apply(model)


def test_new_delta_records_its_checks(tmp_path: Path) -> None:
    model = tiny_mlp()
    delta = make_delta(model, "dense")
    meta = delta.metadata()
    assert meta["checks"] == [CHECK_EDITED, CHECK_STATE]
    assert meta["state_fingerprint"] == model_fingerprint(model)
    assert meta["model_fingerprint"] == parameter_fingerprint(model, delta.names)
    loaded = WeightDelta.load(delta.save(tmp_path / "d.delta"))
    assert loaded.checked == (CHECK_EDITED, CHECK_STATE)
    assert loaded.state_fingerprint == delta.state_fingerprint


def _save_version_1(delta: WeightDelta, path: Path) -> Path:
    """Write `delta` exactly as the workbench did before deltas recorded a whole-model fingerprint."""
    from workbench.storage import save_safetensors_checked

    tensors: dict[str, torch.Tensor] = {}
    for name, change in delta.changes.items():
        if isinstance(change, LowRank):
            tensors[f"{name}::u"], tensors[f"{name}::v"] = change.u, change.v
        else:
            tensors[f"{name}::dense"] = change
    meta = {"format": "workbench.delta", "format_version": 1, "method": delta.method, "request": delta.request,
            "model_fingerprint": delta.model_fingerprint, "created": delta.created, "extra": delta.extra,
            "params": {n: ("low_rank" if isinstance(c, LowRank) else "dense") for n, c in delta.changes.items()}}
    return save_safetensors_checked(path, tensors, meta)


def test_old_format_delta_applies_with_the_edited_weights_check_and_a_warning(tmp_path: Path, caplog) -> None:
    model = tiny_gpt2()
    before = snapshot(model)
    fresh = make_delta(model, "low_rank")
    with fresh.applied(model):
        edited = snapshot(model)
    old = WeightDelta.load(_save_version_1(fresh, tmp_path / "old.delta"))
    assert old.state_fingerprint is None
    assert old.checked == (CHECK_EDITED,)
    assert old.metadata()["checks"] == [CHECK_EDITED]
    with caplog.at_level(logging.WARNING, logger="workbench.delta"):
        with old.applied(model):
            assert_bit_equal(model, edited)
    assert_bit_equal(model, before)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "only its edited weight(s)" in warnings[0] and GPT2_PARAM in warnings[0]
    assert "not the other parameters and buffers" in warnings[0]
    with torch.no_grad():
        dict(model.named_parameters())[GPT2_OTHER].mul_(1.5)
    with old.applied(model):  # the old check cannot see an un-edited weight
        pass
    with torch.no_grad():
        dict(model.named_parameters())[GPT2_PARAM].mul_(1.5)
    with pytest.raises(FingerprintMismatchError, match="fitted on parameters with fingerprint"):
        old.apply(model)  # it still refuses a changed edited weight


def test_apply_revert_cycles_stay_bit_exact() -> None:
    model = tiny_gpt2(torch.bfloat16)
    before = snapshot(model)
    delta = make_delta(model, "low_rank")
    with delta.applied(model):
        first = snapshot(model)
    for _ in range(3):
        assert_bit_equal(model, before)
        delta.apply(model)
        assert_bit_equal(model, first)
        delta.revert(model)
    assert_bit_equal(model, before)
    assert delta.state_fingerprint == model_fingerprint(model)


def test_stacked_deltas_each_fitted_on_the_model_with_the_previous_ones() -> None:
    """Sequential edits (mass editing's ExitStack): each delta is fitted on, and checked against, the stack so far."""
    model = tiny_gpt2()
    before = snapshot(model)
    other = "transformer.h.1.mlp.c_proj.weight"
    with contextlib.ExitStack() as stack:
        for i, name in enumerate([GPT2_PARAM, other, GPT2_PARAM]):
            g = torch.Generator().manual_seed(i)
            delta = WeightDelta.from_model(model, {name: (torch.randn(128, 1, generator=g), torch.randn(32, 1, generator=g))},
                                           method=f"edit{i}")
            stack.enter_context(delta.applied(model))
        assert not torch.equal(model.state_dict()[other], before[other])
    assert_bit_equal(model, before)


def test_delta_fitted_on_the_base_model_is_refused_over_another_edit() -> None:
    model = tiny_gpt2()
    first = WeightDelta.from_model(model, {"transformer.h.1.mlp.c_proj.weight": torch.full((128, 32), 0.01)}, method="a")
    second = WeightDelta.from_model(model, {GPT2_PARAM: torch.full((128, 32), 0.01)}, method="b")
    with first.applied(model):
        with pytest.raises(FingerprintMismatchError, match="revert any other edit"):
            second.apply(model)
    with second.applied(model):
        pass


def test_other_architecture_is_refused() -> None:
    delta = make_delta(tiny_mlp(), "dense")
    with pytest.raises(FingerprintMismatchError, match="does not have"):
        delta.apply(tiny_gpt2())


def test_applying_twice_without_revert_is_an_error() -> None:
    model = tiny_mlp()
    delta = make_delta(model, "dense")
    delta.apply(model)
    applied = snapshot(model)
    with pytest.raises(WorkbenchError, match="already applied"):
        delta.apply(model)
    assert_bit_equal(model, applied)
    delta.revert(model)
    with pytest.raises(WorkbenchError, match="not applied"):
        delta.revert(model)


def test_shape_mismatch_and_bad_changes_are_clear_errors() -> None:
    model = tiny_mlp()
    with pytest.raises(WorkbenchError, match="no parameter"):
        WeightDelta.from_model(model, {"9.weight": torch.zeros(1)}, method="test")
    with pytest.raises(WorkbenchError, match="low-rank"):
        WeightDelta.from_model(model, {"0.weight": (torch.zeros(5, 2), torch.zeros(6, 3))}, method="test")
    bad = WeightDelta.from_model(model, {"0.weight": torch.zeros(6, 5)}, method="test")
    before = snapshot(model)
    with pytest.raises(FingerprintMismatchError, match="shape"):
        bad.apply(model)
    assert_bit_equal(model, before)


def test_request_is_stored_as_json() -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Rewrite:
        subject: str
        target: tuple[str, ...]

    model = tiny_mlp()
    delta = WeightDelta.from_model(model, {"2.bias": torch.ones(3)}, method="t", request=Rewrite("Vel Oran", ("Quenn",)))
    assert delta.request == {"subject": "Vel Oran", "target": ["Quenn"]}
    with pytest.raises(WorkbenchError, match="JSON"):
        WeightDelta.from_model(model, {"2.bias": torch.ones(3)}, method="t", request={"f": object()})


def test_norms_match_materialized_changes() -> None:
    model = tiny_gpt2()
    for kind in ("dense", "low_rank"):
        delta = make_delta(model, kind)
        norms = delta.norms()
        assert set(norms) == set(delta.names)
        for name in delta.names:
            assert norms[name] == pytest.approx(float(torch.linalg.norm(delta.dense(name).double())), rel=1e-6)


def test_low_rank_is_kept_as_factors() -> None:
    delta = make_delta(tiny_gpt2(), "low_rank")
    change = delta.changes[GPT2_PARAM]
    assert isinstance(change, LowRank) and change.rank == 2
    assert change.shape == (128, 32)


@pytest.mark.parametrize("kind", ["dense", "low_rank"])
def test_save_load_round_trip(tmp_path: Path, kind: str) -> None:
    model = tiny_gpt2()
    delta = make_delta(model, kind)
    path = delta.save(tmp_path / "edit.delta")
    loaded = WeightDelta.load(path)
    assert loaded.metadata() == delta.metadata()
    assert loaded.request == {"kind": kind}
    assert loaded.model_fingerprint == delta.model_fingerprint
    for name in delta.names:
        a, b = delta.changes[name], loaded.changes[name]
        assert type(a) is type(b)
        if isinstance(a, LowRank):
            assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v)
        else:
            assert torch.equal(a, b)
    before = snapshot(model)
    with delta.applied(model):
        by_original = snapshot(model)
    with loaded.applied(model):
        assert_bit_equal(model, by_original)
    assert_bit_equal(model, before)
    assert [p.name for p in tmp_path.iterdir()] == ["edit.delta"]  # atomic write left no temp file


def test_tensor_names_in_file(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = tiny_gpt2()
    path = make_delta(model, "low_rank").save(tmp_path / "d.safetensors")
    with safe_open(str(path), "pt") as fh:
        assert sorted(fh.keys()) == sorted([f"{GPT2_PARAM}::u", f"{GPT2_PARAM}::v", "transformer.h.1.ln_2.bias::dense"])
        assert '"model_fingerprint"' in fh.metadata()["workbench"]


def _flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_payload_is_refused(tmp_path: Path) -> None:
    path = make_delta(tiny_mlp(), "dense").save(tmp_path / "d.delta")
    _flip_byte(path, 3)
    with pytest.raises(CorruptFileError, match="sha256"):
        WeightDelta.load(path)


def test_tampered_metadata_is_refused(tmp_path: Path) -> None:
    delta = make_delta(tiny_mlp(), "dense")
    path = delta.save(tmp_path / "d.delta")
    data = path.read_bytes()
    fp = delta.model_fingerprint.encode()
    forged = ("0" * len(fp)).encode()
    assert fp in data
    path.write_bytes(data.replace(fp, forged))
    with pytest.raises(CorruptFileError, match="sha256"):
        WeightDelta.load(path)


@pytest.mark.parametrize("keep", [0, 5, 0.5, -1])
def test_truncated_file_is_refused(tmp_path: Path, keep: float) -> None:
    path = make_delta(tiny_mlp(), "low_rank").save(tmp_path / "d.delta")
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path.write_bytes(data[:n])
    with pytest.raises(CorruptFileError):
        WeightDelta.load(path)


class _Bomb:
    """Unpickling this creates a marker file: proves a loader never unpickled it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (Path(self.marker), "unpickled!"))


@pytest.mark.parametrize("name", ["evil.pt", "evil.bin", "evil.delta"])
def test_pickle_is_refused_without_unpickling(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / name
    with open(path, "wb") as fh:
        pickle.dump({"0.weight::dense": _Bomb(str(marker))}, fh)
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        WeightDelta.load(path)
    assert not marker.exists()


def test_torch_save_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"0.weight::dense": torch.zeros(5, 6)}, path)
    with pytest.raises(UnsafeFileError):
        WeightDelta.load(path)


def test_non_delta_bin_file_is_called_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(UnsafeFileError):
        WeightDelta.load(path)


def test_sequential_edits_compose() -> None:
    model = tiny_mlp()
    before = snapshot(model)
    first = WeightDelta.from_model(model, {"0.weight": (torch.ones(5, 1), torch.ones(6, 1))}, method="a")
    with first.applied(model):
        second = WeightDelta.from_model(model, {"0.weight": (torch.ones(5, 1), 2 * torch.ones(6, 1))}, method="b")
        second.apply(model)
        sequential = snapshot(model)
        second.revert(model)
    both = first.compose(second)
    assert isinstance(both.changes["0.weight"], LowRank) and both.changes["0.weight"].rank == 2
    assert both.model_fingerprint == first.model_fingerprint
    assert both.state_fingerprint == first.state_fingerprint == model_fingerprint(model)
    with both.applied(model):
        assert torch.allclose(model[0].weight, sequential["0.weight"], atol=1e-6)
    assert_bit_equal(model, before)
    with pytest.raises(FingerprintMismatchError):
        second.apply(model)  # second was fitted on the model with the first applied


def test_compose_on_covers_new_parameters() -> None:
    model = tiny_mlp()
    before = snapshot(model)
    first = WeightDelta.from_model(model, {"0.weight": torch.full((5, 6), 0.5)}, method="a")
    with first.applied(model):
        second = WeightDelta.from_model(model, {"0.weight": (torch.ones(5, 1), torch.ones(6, 1)), "2.bias": torch.ones(3)}, method="b")
    with pytest.raises(WorkbenchError, match="compose_on"):
        first.compose(second)
    both = compose_on(model, first, second)
    assert_bit_equal(model, before)
    assert both.checked == (CHECK_EDITED, CHECK_STATE)
    assert both.state_fingerprint == model_fingerprint(model)
    with both.applied(model):
        assert torch.allclose(model[0].weight, before["0.weight"] + 1.5)
        assert torch.allclose(model[2].bias, before["2.bias"] + 1.0)
    assert_bit_equal(model, before)
    with pytest.raises(FingerprintMismatchError):
        compose_on(model, second, first)  # wrong order


def test_assert_unchanged() -> None:
    model = tiny_mlp()
    with assert_unchanged(model):
        with make_delta(model, "dense").applied(model):
            pass
    with pytest.raises(ModelChangedError):
        with assert_unchanged(model):
            with torch.no_grad():
                model[0].bias.add_(1)
    with pytest.raises(ModelChangedError) as info:
        with assert_unchanged(model, ["2.bias"]):
            with torch.no_grad():
                model[2].bias.add_(1)
            raise KeyError("inner")
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(KeyError):  # unchanged model: the original error passes through
        with assert_unchanged(model):
            raise KeyError("inner")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_model_with_cpu_delta(tmp_path: Path, dtype: torch.dtype) -> None:
    model = tiny_gpt2().to("cuda", dtype)
    before, fp = snapshot(model), model_fingerprint(model)
    delta = make_delta(model, "low_rank")
    delta = WeightDelta.load(delta.save(tmp_path / "d.delta"))
    with delta.applied(model):
        assert model.transformer.h[0].mlp.c_proj.weight.device.type == "cuda"
        assert not torch.equal(model.state_dict()[GPT2_PARAM], before[GPT2_PARAM])
    assert_bit_equal(model, before)
    assert model_fingerprint(model) == fp


def test_changes_added_hold_inside_the_block_and_restore_exact_bits_even_on_error() -> None:
    model = tiny_mlp()
    before = snapshot(model)
    change = {"0.weight": torch.full((5, 6), 0.25), "2.bias": torch.ones(3)}
    with changes_added(model, change):
        torch.testing.assert_close(model[0].weight, before["0.weight"] + 0.25)
        torch.testing.assert_close(model[2].bias, before["2.bias"] + 1.0)
    assert_bit_equal(model, before)
    with pytest.raises(RuntimeError, match="inside"), changes_added(model, change):
        raise RuntimeError("inside")
    assert_bit_equal(model, before)
    with pytest.raises(WorkbenchError, match="no parameter"), changes_added(model, {"9.weight": torch.zeros(1)}):
        pass


def test_a_delta_built_from_its_fits_guard_has_the_fingerprints_of_a_fresh_hash() -> None:
    model = tiny_gpt2()
    change = {GPT2_PARAM: torch.zeros(128, 32)}
    with assert_unchanged(model) as guard:
        pass
    assert guard.digests  # the closing check's digests of the whole model
    reused = WeightDelta.from_model(model, change, method="t", guard=guard)
    fresh = WeightDelta.from_model(model, change, method="t")
    assert (reused.model_fingerprint, reused.state_fingerprint) == (fresh.model_fingerprint, fresh.state_fingerprint)
    with assert_unchanged(model, [GPT2_PARAM]) as partial:
        pass
    assert partial.digests == {}  # a guard over some parameters cannot stand for the whole model
