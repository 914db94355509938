"""WeightDelta: bit-exact revert, fingerprint refusal, safe files, sequential edits."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from workbench.delta import LowRank, ModelChangedError, WeightDelta, assert_unchanged, compose_on
from workbench.errors import CorruptFileError, FingerprintMismatchError, UnsafeFileError, WorkbenchError
from workbench.fingerprint import model_fingerprint

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


def test_untouched_parameters_do_not_affect_the_fingerprint() -> None:
    model = tiny_mlp()
    delta = WeightDelta.from_model(model, {"0.weight": torch.ones(5, 6)}, method="test")
    with torch.no_grad():
        model[2].weight.mul_(2)  # not touched by the delta
    before = snapshot(model)
    with delta.applied(model):
        pass
    assert_bit_equal(model, before)


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
