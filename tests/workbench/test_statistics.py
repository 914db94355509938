"""Streaming statistics: exact against direct computation, cached, cache never trusted blindly."""

from __future__ import annotations

import logging
import pickle
import random
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from workbench.errors import WorkbenchError
from workbench.handle import Architecture, ModelHandle
from workbench.statistics import SiteStatistics, StreamingMoments, collect_statistics, forget_all, recall

WORDS = [f"w{i}" for i in range(48)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")  # no pad token


def tiny_handle(*, dropout: float = 0.0) -> ModelHandle:
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32, bos_token_id=1, eos_token_id=1,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    model = GPT2LMHeadModel(cfg).eval()
    arch = Architecture(family="gpt2", n_layers=2, d_model=32, vocab_size=50)
    return ModelHandle(spec="test:tiny-gpt2", model=model, kind="causal_lm", arch=arch, tokenizer=tiny_tokenizer())


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(n)]


class ForwardCounter:
    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


def direct_activations(handle: ModelHandle, module_path: str, side: str, corpus: list[str]) -> torch.Tensor:
    """Activations of every real token, one unpadded text at a time."""
    out: list[torch.Tensor] = []
    module = handle.model.get_submodule(module_path)

    def hook(_m: nn.Module, args: tuple, output: object) -> None:
        value = args[0] if side == "input" else (output[0] if isinstance(output, tuple) else output)
        out.append(value[0].detach().double())

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for text in corpus:
                ids = torch.tensor([handle.tokenizer(text)["input_ids"]])
                handle.model(ids)
    finally:
        h.remove()
    return torch.cat(out)


def assert_matches(stats: SiteStatistics, x: torch.Tensor) -> None:
    # Tolerances cover float32 forward passes run padded-in-batch vs one text at a time; a
    # single padding position counted, or one token missed, is orders of magnitude larger.
    n = x.shape[0]
    assert stats.count == n
    assert stats.mean.dtype == torch.float64
    torch.testing.assert_close(stats.mean, x.mean(0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.second_moment, x.T @ x / n, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(stats.covariance, torch.cov(x.T), rtol=1e-5, atol=1e-7)


# --- StreamingMoments -------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_streaming_moments_match_torch_cov(offset: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 5, generator=g, dtype=torch.float64) * 3 + offset
    mask = torch.rand(2, 37, generator=g) > 0.3
    moments = StreamingMoments(5)
    bounds = [0, 1, 13, 30, 37]  # batches of uneven size, one of them a single position
    for lo, hi in zip(bounds, bounds[1:]):
        moments.update(x[:, lo:hi], mask[:, lo:hi])
    rows = x[mask]
    assert moments.count == rows.shape[0] == int(mask.sum())
    torch.testing.assert_close(moments.mean, rows.mean(0), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(moments.covariance, torch.cov(rows.T), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(moments.second_moment, rows.T @ rows / rows.shape[0], rtol=1e-12, atol=1e-6)


def test_merge_equals_single_pass() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 4, generator=g)
    whole, a, b, empty = StreamingMoments(4), StreamingMoments(4), StreamingMoments(4), StreamingMoments(4)
    whole.update(x)
    a.update(x[:30])
    b.update(x[30:])
    a.merge(b).merge(empty)
    assert a.count == 100
    torch.testing.assert_close(a.mean, whole.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.covariance, whole.covariance, rtol=1e-12, atol=1e-12)


def test_low_precision_input_is_accumulated_in_float64() -> None:
    x = torch.full((3000, 2), 1.0 + 2**-7, dtype=torch.bfloat16)
    moments = StreamingMoments(2)
    for chunk in x.split(7):
        moments.update(chunk)
    assert moments.mean.dtype == torch.float64
    assert moments.mean.tolist() == [1.0 + 2**-7] * 2
    assert torch.all(moments.covariance.abs() < 1e-12)


def test_moment_errors_are_clear() -> None:
    moments = StreamingMoments(3)
    with pytest.raises(WorkbenchError, match="at least 1"):
        moments.mean
    moments.update(torch.ones(1, 3))
    with pytest.raises(WorkbenchError, match="at least 2"):
        moments.covariance
    with pytest.raises(WorkbenchError, match="last dimension 4"):
        moments.update(torch.ones(2, 4))
    with pytest.raises(WorkbenchError, match="mask"):
        moments.update(torch.ones(2, 5, 3), torch.ones(5, dtype=torch.bool))


# --- collect_statistics -----------------------------------------------------------------


@pytest.mark.parametrize(
    "site,module_path,side",
    [
        ("blocks.0.mlp.hook_post", "transformer.h.0.mlp.c_proj", "input"),
        ("blocks.1.hook_resid_post", "transformer.h.1", "output"),
    ],
)
def test_text_statistics_equal_direct_computation(site: str, module_path: str, side: str) -> None:
    handle = tiny_handle()
    corpus = texts(23)
    stats = collect_statistics(handle, site, corpus, batch_size=5, cache=False, progress=False)
    x = direct_activations(handle, module_path, side, corpus)  # padding excluded by construction
    assert_matches(stats, x)
    assert stats.site == site and stats.key is None


def test_n_samples_takes_the_first_tokens_exactly() -> None:
    handle = tiny_handle()
    corpus = texts(23)
    stats = collect_statistics(handle, "blocks.0.hook_resid_post", corpus, n_samples=50, batch_size=4, cache=False, progress=False)
    x = direct_activations(handle, "transformer.h.0", "output", corpus)[:50]
    assert_matches(stats, x)


def test_corpus_shorter_than_n_samples_uses_all_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    handle = tiny_handle()
    corpus = texts(3)
    with caplog.at_level(logging.WARNING, logger="workbench.statistics"):
        stats = collect_statistics(handle, "blocks.0.hook_resid_post", corpus, n_samples=10_000, cache=False, progress=False)
    assert stats.count == sum(len(t.split()) for t in corpus)
    assert "ran out" in caplog.text


def test_dropout_is_off_and_training_mode_restored() -> None:
    handle = tiny_handle(dropout=0.5)
    handle.model.train()
    corpus = texts(6)
    a = collect_statistics(handle, "blocks.1.hook_resid_post", corpus, cache=False, progress=False)
    b = collect_statistics(handle, "blocks.1.hook_resid_post", corpus, cache=False, progress=False)
    assert torch.equal(a.covariance, b.covariance)
    assert handle.model.training


def test_cache_hit_skips_forward_passes(tmp_path: Path) -> None:
    handle = tiny_handle()
    counter = ForwardCounter(handle.model)
    corpus = texts(12)
    first = collect_statistics(handle, "blocks.0.mlp.hook_post", corpus, batch_size=4, cache=tmp_path, progress=False)
    assert counter.calls == 3
    assert first.key is not None and (tmp_path / "stats" / f"{first.key}.safetensors").is_file()
    second = collect_statistics(handle, "blocks.0.mlp.hook_post", corpus, batch_size=4, cache=tmp_path, progress=False)
    assert counter.calls == 3
    assert second.key == first.key and second.count == first.count
    for field in ("mean", "second_moment", "covariance"):
        assert torch.equal(getattr(first, field), getattr(second, field))


def test_cache_key_depends_on_model_site_corpus_and_count(tmp_path: Path) -> None:
    handle = tiny_handle()
    corpus = texts(8)
    base = collect_statistics(handle, "blocks.0.mlp.hook_post", corpus, cache=tmp_path, progress=False)
    keys = {
        base.key,
        collect_statistics(handle, "blocks.1.mlp.hook_post", corpus, cache=tmp_path, progress=False).key,
        collect_statistics(handle, "blocks.0.mlp.hook_post", corpus[:-1], cache=tmp_path, progress=False).key,
        collect_statistics(handle, "blocks.0.mlp.hook_post", corpus, n_samples=20, cache=tmp_path, progress=False).key,
        collect_statistics(handle, "blocks.0.mlp.hook_post", corpus, corpus_id="named", cache=tmp_path, progress=False).key,
    }
    with torch.no_grad():
        handle.model.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0
    changed = collect_statistics(handle, "blocks.0.mlp.hook_post", corpus, cache=tmp_path, progress=False)
    keys.add(changed.key)
    assert len(keys) == 6
    assert not torch.equal(changed.mean, base.mean)


def test_cache_location_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "env"))
    stats = collect_statistics(tiny_handle(), "blocks.0.hook_resid_post", texts(4), progress=False)
    assert (tmp_path / "env" / "stats" / f"{stats.key}.safetensors").is_file()


def _corrupt_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _corrupt_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _corrupt_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"mean": [0.0]}))


def _corrupt_garbage(path: Path) -> None:
    path.write_text("not a cache")


@pytest.mark.parametrize("corrupt", [_corrupt_flip, _corrupt_truncate, _corrupt_pickle, _corrupt_garbage])
def test_corrupted_cache_is_recomputed(tmp_path: Path, corrupt, caplog: pytest.LogCaptureFixture) -> None:
    handle = tiny_handle()
    counter = ForwardCounter(handle.model)
    corpus = texts(8)
    good = collect_statistics(handle, "blocks.0.mlp.hook_post", corpus, batch_size=8, cache=tmp_path, progress=False)
    path = tmp_path / "stats" / f"{good.key}.safetensors"
    corrupt(path)
    forget_all()  # the file on disk is under test, not this process's memory of it
    with caplog.at_level(logging.WARNING, logger="workbench.statistics"):
        again = collect_statistics(handle, "blocks.0.mlp.hook_post", corpus, batch_size=8, cache=tmp_path, progress=False)
    assert counter.calls == 2  # recomputed, not trusted
    assert "recomputing" in caplog.text and str(path) in caplog.text
    assert torch.equal(again.covariance, good.covariance)
    forget_all()
    collect_statistics(handle, "blocks.0.mlp.hook_post", corpus, batch_size=8, cache=tmp_path, progress=False)
    assert counter.calls == 2  # the rewritten file is valid again


def test_one_shot_iterator_needs_corpus_id_to_cache(tmp_path: Path) -> None:
    handle = tiny_handle()
    counter = ForwardCounter(handle.model)
    corpus = texts(4)
    s1 = collect_statistics(handle, "blocks.0.hook_resid_post", iter(corpus), cache=tmp_path, progress=False)
    assert s1.key is None
    s2 = collect_statistics(handle, "blocks.0.hook_resid_post", iter(corpus), corpus_id="c1", cache=tmp_path, progress=False)
    s3 = collect_statistics(handle, "blocks.0.hook_resid_post", iter(corpus), corpus_id="c1", cache=tmp_path, progress=False)
    assert counter.calls == 2 and s2.key == s3.key is not None
    assert torch.equal(s1.mean, s3.mean)


def test_bert_padding_and_token_types_are_handled() -> None:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, pad_token_id=0)
    handle = ModelHandle(spec="test:tiny-bert", model=BertForMaskedLM(cfg).eval(), kind="masked_lm",
                         arch=Architecture(family="bert", n_layers=2), tokenizer=tiny_tokenizer())
    corpus = texts(9)
    stats = collect_statistics(handle, "blocks.1.mlp.hook_post", corpus, batch_size=4, cache=False, progress=False)
    # bidirectional attention: counting padding, or letting real tokens attend to it, would show here
    assert_matches(stats, direct_activations(handle, "bert.encoder.layer.1.output.dense", "input", corpus))


def test_forward_pass_stops_at_the_site() -> None:
    handle = tiny_handle()
    later = ForwardCounter(handle.model.transformer.h[1])
    collect_statistics(handle, "blocks.0.mlp.hook_post", texts(6), batch_size=2, cache=False, progress=False)
    assert later.calls == 0


def test_tensor_batches_on_a_cnn_per_channel() -> None:
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1))
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(5, 3, 8, 8, generator=g) for _ in range(3)]
    stats = collect_statistics(cnn, "1", batches, feature_dim=1, cache=False, progress=False)
    with torch.no_grad():
        x = torch.cat([torch.relu(cnn[0](b)) for b in batches]).double()
    assert_matches(stats, x.movedim(1, -1).reshape(-1, 4))
    inp = collect_statistics(cnn, "2:input", batches, feature_dim=1, n_samples=7, cache=False, progress=False)
    assert inp.count == 7


def test_dict_batches_with_attention_mask() -> None:
    handle = tiny_handle()
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    stats = collect_statistics(handle.model, "blocks.0.hook_resid_post", [{"input_ids": ids, "attention_mask": mask}], cache=False, progress=False)
    corpus = ["w1 w2 w3 w4", "w5 w6"]  # token ids 3..8
    assert_matches(stats, direct_activations(handle, "transformer.h.0", "output", corpus))


def test_bad_inputs_are_clear_errors() -> None:
    handle = tiny_handle()
    with pytest.raises(WorkbenchError, match="unknown site"):
        collect_statistics(handle, "blocks.9.mlp.hook_post", texts(2), cache=False, progress=False)
    with pytest.raises(WorkbenchError, match="tokenizer"):
        collect_statistics(handle.model, "blocks.0.mlp.hook_post", texts(2), cache=False, progress=False)
    with pytest.raises(WorkbenchError, match="empty"):
        collect_statistics(handle, "blocks.0.mlp.hook_post", [], cache=False, progress=False)
    with pytest.raises(WorkbenchError, match="n_samples"):
        collect_statistics(handle, "blocks.0.mlp.hook_post", texts(2), n_samples=0, cache=False, progress=False)


def test_progress_goes_to_stderr(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("workbench.progress.is_terminal", lambda stream: True)  # a live bar, as on a terminal
    collect_statistics(tiny_handle(), "blocks.0.hook_resid_post", texts(4), n_samples=10, cache=False, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "statistics blocks.0.hook_resid_post" in captured.err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model_statistics_match_cpu() -> None:
    handle = tiny_handle()
    corpus = texts(10)
    cpu = collect_statistics(handle, "blocks.0.mlp.hook_post", corpus, cache=False, progress=False)
    handle.model.to("cuda")
    gpu = collect_statistics(handle, "blocks.0.mlp.hook_post", corpus, cache=False, progress=False)
    assert gpu.mean.device.type == "cuda" and gpu.count == cpu.count
    torch.testing.assert_close(gpu.covariance.cpu(), cpu.covariance, rtol=1e-4, atol=1e-5)


# --- costs that do not repeat: memory, checkpoints, lazy corpora ----------------------------


def test_memory_hit_reads_no_disk_and_runs_no_forward(tmp_path: Path) -> None:
    handle = tiny_handle()
    counter = ForwardCounter(handle.model)
    first = collect_statistics(handle, "blocks.0.mlp.hook_post", texts(12), batch_size=4, cache=tmp_path, progress=False)
    assert recall(first.key) is first
    (tmp_path / "stats" / f"{first.key}.safetensors").unlink()  # a disk read would now recompute
    second = collect_statistics(handle, "blocks.0.mlp.hook_post", texts(12), batch_size=4, cache=tmp_path, progress=False)
    assert counter.calls == 3 and second.count == first.count
    assert torch.equal(second.second_moment, first.second_moment)


def test_memory_budget_drops_the_least_recently_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handle = tiny_handle()
    a = collect_statistics(handle, "blocks.0.hook_resid_post", texts(4), cache=tmp_path, progress=False)
    one = sum(t.numel() * t.element_size() for t in (a.mean, a.second_moment, a.covariance))
    monkeypatch.setenv("WORKBENCH_STATS_MEMORY", str(one * 2))
    b = collect_statistics(handle, "blocks.1.hook_resid_post", texts(4), cache=tmp_path, progress=False)
    assert recall(a.key) is not None  # two fit; recalling a leaves b the least recently used
    c = collect_statistics(handle, "blocks.0.hook_resid_pre", texts(4), cache=tmp_path, progress=False)
    assert recall(b.key) is None and recall(a.key) is not None and recall(c.key) is not None
    monkeypatch.setenv("WORKBENCH_STATS_MEMORY", "0")
    forget_all()
    d = collect_statistics(handle, "blocks.1.hook_resid_pre", texts(4), cache=tmp_path, progress=False)
    assert recall(d.key) is None
    monkeypatch.setenv("WORKBENCH_STATS_MEMORY", "lots")
    with pytest.raises(WorkbenchError, match="WORKBENCH_STATS_MEMORY"):
        collect_statistics(handle, "blocks.0.mlp.hook_post", texts(4), cache=tmp_path, progress=False)


def test_cache_hit_draws_one_text_of_a_lazy_corpus(tmp_path: Path) -> None:
    handle = tiny_handle()
    drawn = []

    def corpus():
        for t in texts(16):
            drawn.append(t)
            yield t

    collect_statistics(handle, "blocks.0.mlp.hook_post", corpus(), corpus_id="lazy", cache=tmp_path, progress=False)
    assert len(drawn) == 16
    drawn.clear()
    forget_all()  # from disk this time
    collect_statistics(handle, "blocks.0.mlp.hook_post", corpus(), corpus_id="lazy", cache=tmp_path, progress=False)
    assert len(drawn) == 1


class Interrupted(Exception):
    pass


class Killer:
    """Raises `Interrupted` at the start of forward pass number `at` (1-based), as a kill would stop a run."""

    def __init__(self, model: nn.Module, at: int) -> None:
        self.calls, self.at = 0, at
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1
        if self.calls == self.at:
            raise Interrupted


def test_interrupted_collection_resumes_to_the_same_bits(tmp_path: Path) -> None:
    handle = tiny_handle()
    corpus = texts(40)
    site = "blocks.1.mlp.hook_post"
    whole = collect_statistics(handle, site, corpus, batch_size=4, cache=False, progress=False)
    killer = Killer(handle.model, at=7)  # killed in batch 7, after checkpoints at batches 3 and 6
    with pytest.raises(Interrupted):
        collect_statistics(handle, site, iter(corpus), corpus_id="forty", batch_size=4, cache=tmp_path,
                           checkpoint_every=3, progress=False)
    killer.handle.remove()
    partial = list((tmp_path / "stats").glob("*.partial.safetensors"))
    assert len(partial) == 1
    counter = ForwardCounter(handle.model)
    resumed = collect_statistics(handle, site, iter(corpus), corpus_id="forty", batch_size=4, cache=tmp_path,
                                 checkpoint_every=3, progress=False)
    assert counter.calls == 10 - 6  # only the batches after the last checkpoint
    assert resumed.count == whole.count
    for field in ("mean", "second_moment", "covariance"):
        assert torch.equal(getattr(resumed, field), getattr(whole, field))
    assert not partial[0].exists()  # the finished file replaces the checkpoint


def test_damaged_checkpoint_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    handle = tiny_handle()
    corpus = texts(20)
    killer = Killer(handle.model, at=3)
    with pytest.raises(Interrupted):
        collect_statistics(handle, "blocks.0.mlp.hook_post", iter(corpus), corpus_id="twenty",
                           batch_size=4, cache=tmp_path, checkpoint_every=1, progress=False)
    killer.handle.remove()
    (partial,) = (tmp_path / "stats").glob("*.partial.safetensors")
    _corrupt_flip(partial)
    counter = ForwardCounter(handle.model)
    with caplog.at_level(logging.WARNING, logger="workbench.statistics"):
        stats = collect_statistics(handle, "blocks.0.mlp.hook_post", iter(corpus), corpus_id="twenty", batch_size=4,
                                   cache=tmp_path, checkpoint_every=1, progress=False)
    assert "starting over" in caplog.text and counter.calls == 5
    whole = collect_statistics(handle, "blocks.0.mlp.hook_post", corpus, batch_size=4, cache=False, progress=False)
    assert torch.equal(stats.covariance, whole.covariance)
    with pytest.raises(WorkbenchError, match="checkpoint_every"):
        collect_statistics(handle, "blocks.0.mlp.hook_post", corpus, cache=tmp_path, checkpoint_every=0, progress=False)


def test_text_batches_are_sorted_by_length_and_count_the_first_tokens_in_corpus_order() -> None:
    from workbench.statistics import _sorted_text_batches

    tok = tiny_tokenizer()
    corpus = texts(40, seed=3)
    lengths = [len(tok(t)["input_ids"]) for t in corpus]
    batches = list(_sorted_text_batches(iter(corpus), tok, 4, 32, torch.device("cpu"), None))
    padded = sum(int(b["input_ids"].numel()) for b in batches)
    unsorted = sum(4 * max(lengths[i:i + 4]) for i in range(0, 40, 4))
    assert sum(int(b["sample_mask"].sum()) for b in batches) == sum(lengths)
    assert padded < unsorted  # sorting within the window cut the padding
    cut = list(_sorted_text_batches(iter(corpus), tok, 4, 32, torch.device("cpu"), lengths[0] + 2))
    counted = sorted(int(row.sum()) for b in cut for row in b["sample_mask"] if row.sum())
    assert counted == sorted([lengths[0], 2])  # the first text whole, then two tokens of the second
