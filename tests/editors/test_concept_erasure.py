"""Concept erasure folded into weights: equals the run-time eraser, erases linearly, refuses what cannot fold."""

from __future__ import annotations

import logging

import pytest
import torch

from editors.concept_erasure import (
    ConceptData,
    ConceptErasure,
    erasure_hook,
    example_sentences,
    fit_eraser,
    probe_accuracy,
    representations,
)
from editors.folding import NotFoldableError
from workbench.errors import WorkbenchError
from workbench.fingerprint import model_fingerprint

WORDS = "the a of is in to and city river country cat dog fox quick brown jumps over lazy one two three four".split()


def _data(n: int = 96, seed: int = 0) -> ConceptData:
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(n):
        words = [WORDS[int(j)] for j in torch.randint(len(WORDS), (5,), generator=g)]
        label = i % 2
        texts.append(" ".join([("red" if label else "blue"), *words, ("paris" if label else "rome")]))
        labels.append(label)
    return ConceptData.of(texts, labels)


def _cross_cov(x: torch.Tensor, y: list[int]) -> float:
    z = torch.tensor(y, dtype=torch.float64)
    xc = x.double() - x.double().mean(0)
    return float(((z - z.mean())[:, None] * xc).mean(0).abs().max())


def _hidden(h, texts):
    enc = {k: v for k, v in h.tokenizer(texts, return_tensors="pt", padding=True).items()
           if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        out = h.model(**enc, output_hidden_states=True)
    return out.hidden_states[-1]


@pytest.mark.parametrize("family,site,probe_site", [
    ("gpt2", "blocks.0.mlp.hook_out", "blocks.0.mlp.hook_out"),        # written by c_proj (Conv1D)
    ("gpt_neox", "blocks.1.attn.hook_out", "blocks.1.attn.hook_out"),  # written by attention.dense
    ("bert", "blocks.0.mlp.hook_out", "blocks.0.mlp.hook_out"),        # written by output.dense
    ("gpt2", "blocks.1.mlp.hook_post", "blocks.1.mlp.hook_out"),       # read by c_proj: its output is erased
])
def test_fold_equals_hook_and_erases(load_tiny, family: str, site: str, probe_site: str) -> None:
    h = load_tiny(family)
    data = _data()
    before = model_fingerprint(h.model)
    x0, _ = representations(h, probe_site, list(data.inputs))
    delta = ConceptErasure(site).fit(h, data)
    assert model_fingerprint(h.model) == before
    eraser = fit_eraser(h, site, data)
    with erasure_hook(h, site, eraser):
        want = _hidden(h, list(data.inputs[:6]))
    with delta.applied(h.model):
        got = _hidden(h, list(data.inputs[:6]))
        x1, _ = representations(h, probe_site, list(data.inputs))
    assert torch.allclose(got, want, atol=1e-4)
    assert model_fingerprint(h.model) == before  # revert is bit-exact
    c0, c1 = _cross_cov(x0, list(data.labels)), _cross_cov(x1, list(data.labels))
    assert c0 > 1e-5 and c1 < 1e-3 * c0  # no linear signal left (LEACE's guarantee, on its data)


def test_llama_without_bias_needs_affine_false(load_tiny) -> None:
    h = load_tiny("llama")
    data = _data()
    with pytest.raises(NotFoldableError, match="affine=False"):
        ConceptErasure("blocks.0.mlp.hook_out").fit(h, data)
    delta = ConceptErasure("blocks.0.mlp.hook_out", affine=False).fit(h, data)
    eraser = fit_eraser(h, "blocks.0.mlp.hook_out", data, affine=False)
    with erasure_hook(h, "blocks.0.mlp.hook_out", eraser):
        want = _hidden(h, list(data.inputs[:4]))
    with delta.applied(h.model):
        assert torch.allclose(_hidden(h, list(data.inputs[:4])), want, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_residual_stream_is_refused_with_the_hook_offered(load_tiny, family: str) -> None:
    h = load_tiny(family)
    data = _data(40)
    with pytest.raises(NotFoldableError, match="erasure_hook") as err:
        ConceptErasure("blocks.0.hook_resid_post").fit(h, data)
    assert ("post-LN" if family == "bert" else "pre-LN") in str(err.value)
    eraser = fit_eraser(h, "blocks.0.hook_resid_post", data)  # the offered route works
    with erasure_hook(h, "blocks.0.hook_resid_post", eraser):
        x, _ = representations(h, "blocks.0.hook_resid_post", list(data.inputs))
    assert _cross_cov(x, list(data.labels)) < 1e-3


def test_bad_concept_data(load_tiny, caplog: pytest.LogCaptureFixture) -> None:
    h = load_tiny("gpt2")
    editor = ConceptErasure("blocks.0.mlp.hook_out")
    with pytest.raises(WorkbenchError, match="empty"):
        editor.fit(h, ConceptData.of([], []))
    with pytest.raises(WorkbenchError, match="single class"):
        editor.fit(h, ConceptData.of(["the cat", "the dog"], [1, 1]))
    with pytest.raises(WorkbenchError, match="one label per input"):
        editor.fit(h, ConceptData.of(["the cat", "the dog"], [1]))
    texts = list(_data(40).inputs)
    with caplog.at_level(logging.WARNING):
        editor.fit(h, ConceptData.of(texts, [1] * 36 + [0] * 4))
    assert "unbalanced" in caplog.text


def test_probe_and_example_sentences() -> None:
    texts, sentiment, topic = example_sentences(40, seed=0)
    assert len(set(texts)) > 30 and sum(sentiment) == 20 and set(topic) == {0, 1, 2, 3}
    assert example_sentences(40, seed=0) == (texts, sentiment, topic)
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    assert probe_accuracy(x[:150], y[:150], x[150:], y[150:]) > 0.9
    assert probe_accuracy(x[:150, 1:], y[:150], x[150:, 1:], y[150:]) < 0.75


@pytest.mark.slow
def test_minilm_sentiment_erasure_keeps_topic() -> None:
    import workbench as wb

    torch.set_num_threads(1)
    h = wb.load("minilm", device="cpu", progress=False)
    texts, sentiment, topic = example_sentences(600, seed=0)
    site = "blocks.3.mlp.hook_out"
    delta = ConceptErasure(site).fit(h, ConceptData.of(texts[:400], sentiment[:400]))
    s, t = torch.tensor(sentiment), torch.tensor(topic)

    def probes() -> tuple[float, float]:
        x, _ = representations(h, site, texts)
        return (probe_accuracy(x[:400], s[:400], x[400:], s[400:]), probe_accuracy(x[:400], t[:400], x[400:], t[400:]))

    (s0, t0) = probes()
    with delta.applied(h.model):
        (s1, t1) = probes()
    assert s0 > 0.9 and s1 < 0.6 and abs(t1 - t0) <= 0.02


@pytest.mark.parametrize("n_classes,method", [(2, "leace"), (3, "leace"), (2, "orth"), (4, "orth")])
def test_reported_rank_is_the_numerical_rank_of_the_folded_change(load_tiny, n_classes: int, method: str) -> None:
    h = load_tiny("gpt2")
    base = _data(120, seed=1)
    labels = [i % n_classes for i in range(120)]
    texts = [f"{WORDS[7 + c]} {t}" for t, c in zip(base.inputs, labels)]
    for site in ("blocks.0.mlp.hook_out", "blocks.1.mlp.hook_post"):  # a write fold and a read fold
        delta = ConceptErasure(site, method=method).fit(h, ConceptData.of(texts, labels))
        weight = next(n for n in delta.names if n.endswith("weight"))
        assert delta.extra["rank"] == int(torch.linalg.matrix_rank(delta.dense(weight).float()))
        if method == "leace":  # k classes: k columns, k - 1 independent (the indicators sum to one)
            assert delta.extra["rank"] == n_classes - 1


def test_stratified_split_keeps_class_shares_and_ignores_file_order() -> None:
    from editors.concept_erasure import stratified_split

    labels = [0] * 30 + [1] * 10 + [2] * 5
    keys = [f"text {i}" for i in range(45)]
    train, test = stratified_split(labels, train_share=0.6, seed=4, keys=keys)
    assert sorted(train + test) == list(range(45))
    assert [sum(labels[i] == c for i in train) for c in range(3)] == [18, 6, 3]
    assert [sum(labels[i] == c for i in test) for c in range(3)] == [12, 4, 2]
    order = list(range(45))[::-1]
    train2, test2 = stratified_split([labels[i] for i in order], train_share=0.6, seed=4, keys=[keys[i] for i in order])
    assert sorted(keys[order[i]] for i in test2) == sorted(keys[i] for i in test)
    assert stratified_split(labels, train_share=0.6, seed=5, keys=keys)[1] != test
    tr, te = stratified_split([0, 0, 1, 1], train_share=0.9, seed=0)  # a small class still reaches both parts
    assert sorted([0, 0, 1, 1][i] for i in tr) == sorted([0, 0, 1, 1][i] for i in te) == [0, 1]
    with pytest.raises(WorkbenchError, match="train share"):
        stratified_split(labels, train_share=1.0, seed=0)
