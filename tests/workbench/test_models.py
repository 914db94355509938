"""The loader: every spec kind, the architecture it reports, and clear errors for bad input."""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import D_MODEL, VOCAB, build_tiny
from workbench.errors import CorruptFileError, UnknownModelError, UnsafeFileError, WorkbenchError
from workbench.models import dummy_input, encode_sentences, load, minilm_path, run_model, wrap_hf_model
from workbench.sites import list_sites, resolve_site

KINDS = {"gpt2": "causal_lm", "gpt_neox": "causal_lm", "llama": "causal_lm", "bert": "masked_lm"}
D_MLP = {"gpt2": 4 * D_MODEL, "gpt_neox": 64, "llama": 64, "bert": 64}


def test_local_folder_loads_with_architecture(tiny_lm, tiny_model_dirs) -> None:
    family = tiny_lm.arch.family
    assert tiny_lm.kind == KINDS[family]
    arch = tiny_lm.arch
    assert (arch.n_layers, arch.d_model, arch.d_mlp, arch.n_heads, arch.vocab_size) == (2, D_MODEL, D_MLP[family], 4, VOCAB)
    assert arch.site_map is not None and arch.site_map.family == family
    assert not tiny_lm.model.training
    assert tiny_lm.path == tiny_model_dirs[family] and tiny_lm.tokenizer is not None
    assert all(p.dtype == torch.float32 for p in tiny_lm.model.parameters())
    # the reloaded weights are the saved ones
    original, _ = build_tiny(family)
    inputs = dummy_input(tiny_lm)
    with torch.no_grad():
        assert torch.equal(run_model(original, inputs).logits, run_model(tiny_lm.model, inputs).logits)


def test_dtype_option(tiny_model_dirs) -> None:
    h = load(str(tiny_model_dirs["llama"]), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in h.model.parameters()} == {torch.bfloat16}
    with pytest.raises(WorkbenchError, match="unknown dtype"):
        load(str(tiny_model_dirs["llama"]), device="cpu", dtype="float7")


def test_wrap_hf_model_describes_in_memory_model() -> None:
    model, tok = build_tiny("gpt2")
    model.train()
    h = wrap_hf_model(model, tok, spec="test:gpt2")
    assert h.kind == "causal_lm" and h.arch.d_mlp == 4 * D_MODEL and not model.training
    assert resolve_site(h, "blocks.1.mlp.hook_post").module_path == "transformer.h.1.mlp.c_proj"
    base = wrap_hf_model(model.transformer, tok, spec="test:gpt2-base")
    assert base.kind == "encoder" and base.arch.site_map is not None


def test_dummy_input_for_image_handle(cnn_handle) -> None:
    x = dummy_input(cnn_handle, batch_size=3)
    assert x.shape == (3, 3, 16, 16) and float(x.abs().sum()) == 0.0
    assert run_model(cnn_handle.model, x).shape == (3, 5)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_pickle_only_folder_is_refused(tiny_model_dirs, tmp_path: Path) -> None:
    folder = _copy(tiny_model_dirs["gpt2"], tmp_path / "pickled")
    model, _ = build_tiny("gpt2")
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError) as err:
        load(str(folder), device="cpu")
    msg = str(err.value)
    assert "pytorch_model.bin" in msg and "never unpickles" in msg and "safe_serialization=True" in msg
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        load(str(folder / "pytorch_model.bin"), device="cpu")


def test_stray_pickle_beside_safetensors_is_ignored(tiny_model_dirs, tmp_path: Path) -> None:
    folder = _copy(tiny_model_dirs["gpt2"], tmp_path / "mixed")
    (folder / "training_args.bin").write_bytes(b"\x80\x04not really a pickle")
    assert load(str(folder), device="cpu").kind == "causal_lm"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_is_reported(tiny_model_dirs, tmp_path: Path, damage: str) -> None:
    folder = _copy(tiny_model_dirs["llama"], tmp_path / "corrupt")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07junk" * 64, "empty": b""}[damage])
    with pytest.raises(CorruptFileError, match="model.safetensors"):
        load(str(folder), device="cpu")


def test_missing_config_or_weights(tiny_model_dirs, tmp_path: Path) -> None:
    folder = _copy(tiny_model_dirs["bert"], tmp_path / "noconfig")
    (folder / "config.json").unlink()
    with pytest.raises(UnknownModelError, match="no config.json"):
        load(str(folder), device="cpu")
    folder = _copy(tiny_model_dirs["bert"], tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UnknownModelError, match="no \\*.safetensors"):
        load(str(folder), device="cpu")


@pytest.mark.parametrize("spec, match", [
    ("zoo:no-such-model", "the zoo has"),
    ("./no/such/folder", "no model folder"),
    ("not a model name!", "valid specs"),
    ("", "empty model spec"),
])
def test_unknown_specs(spec: str, match: str) -> None:
    with pytest.raises(UnknownModelError, match=match):
        load(spec, device="cpu")


def test_offline_hub_name_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(UnknownModelError) as err:
        load("workbench-tests/definitely-not-cached", device="cpu")
    assert time.perf_counter() - start < 10
    msg = str(err.value)
    assert "could not be found locally" in msg and "downloaded" in msg and "HF_HUB_OFFLINE" in msg
    assert "zoo:factgpt" in msg and "minilm" in msg


def test_device_map_needs_accelerate(tiny_model_dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(WorkbenchError, match="accelerate"):
        load(str(tiny_model_dirs["gpt2"]), device_map="auto")


# --- MiniLM -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        yield load("minilm", device="cpu")
    finally:
        mp.undo()


def test_minilm_loads_offline(minilm) -> None:
    assert minilm.kind == "encoder" and minilm.arch.family == "bert"
    assert (minilm.arch.n_layers, minilm.arch.d_model, minilm.arch.d_mlp) == (6, 384, 1536)
    assert minilm.info["max_seq_length"] == 256 and minilm.info["normalize"] and minilm.info["pooling"] == "mean"
    sites = [s for s in list_sites(minilm) if s.canonical]
    assert resolve_site(minilm, "blocks.5.mlp.hook_post").module_path == "encoder.layer.5.output.dense"
    assert len(sites) == 3 + 6 * 7


def test_minilm_matches_sentence_transformers(minilm, monkeypatch: pytest.MonkeyPatch) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    texts = [
        "The capital of France is Paris.",
        "A cat sat on the mat",
        "interpretability findings become weight edits",
        "word " * 400,  # longer than max_seq_length: truncated the same way
        "x",
    ]
    reference = sentence_transformers.SentenceTransformer(str(minilm_path()), device="cpu")
    expected = reference.encode(texts, convert_to_tensor=True, batch_size=2)
    ours = encode_sentences(minilm, texts, batch_size=3)
    assert ours.shape == (len(texts), 384)
    torch.testing.assert_close(ours, expected.cpu().float(), atol=1e-5, rtol=0)
    norms = ours.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(len(texts)))
    raw = encode_sentences(minilm, texts[:2], batch_size=2, normalize=False)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(2))


def test_progress_false_silences_bars_and_restores_setting(tiny_model_dirs) -> None:
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    load(str(tiny_model_dirs["gpt2"]), device="cpu", progress=False)
    assert hf_logging.is_progress_bar_enabled()
