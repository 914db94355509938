"""CounterFact metrics: exact values on hand-built cases, and scores checked against direct forward passes."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.counterfact import (
    aggregate_cases,
    bootstrap_intervals,
    case_metrics,
    evaluate_rewrites,
    harmonic_mean,
    ngram_entropy,
    score_continuations,
)
from workbench.errors import WorkbenchError
from workbench.requests import Rewrite
from workbench.tokens import encode_prompt


def _rw(**kw):
    base = dict(prompt="the capital of {} is", subject="vel oran", target_new="paris", target_true="rome")
    base.update(kw)
    return Rewrite(**base)


def test_ngram_entropy_exact() -> None:
    # bigrams (a b) x2, (b a) x1; trigrams (a b a), (b a b) once each
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("the the the the the") == 0.0
    assert ngram_entropy("") == 0.0
    assert ngram_entropy("one two three four five six") > ngram_entropy("one two one two one two")


def test_harmonic_mean() -> None:
    assert harmonic_mean([100.0, 50.0, 100.0]) == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 100))
    assert harmonic_mean([100.0, 0.0, 100.0]) == 0.0
    assert harmonic_mean([100.0, None, 100.0]) is None


def test_case_metrics_exact() -> None:
    lp = math.log
    scored = {
        # (log P(new), log P(true), new is top-1, true is top-1)
        "rewrite": [(lp(0.6), lp(0.3), True, False)],
        "paraphrase": [(lp(0.5), lp(0.2), True, False), (lp(0.1), lp(0.4), False, True)],
        "neighborhood": [(lp(0.1), lp(0.8), False, True), (lp(0.3), lp(0.2), False, False),
                         (lp(0.05), lp(0.9), False, True), (lp(0.2), lp(0.6), False, True)],
    }
    m = case_metrics(_rw(), scored)
    assert m["ES"] == 1.0 and m["PS"] == 0.5 and m["NS"] == 0.75
    assert m["EM"] == pytest.approx(0.3)
    assert m["PM"] == pytest.approx(((0.5 - 0.2) + (0.1 - 0.4)) / 2)
    assert m["NM"] == pytest.approx(((0.8 - 0.1) + (0.2 - 0.3) + (0.9 - 0.05) + (0.6 - 0.2)) / 4)
    assert (m["EA"], m["PA"], m["NA"]) == (1.0, 0.5, 0.75)
    assert m["rewrite_p_new"] == pytest.approx(0.6)


def test_aggregate_exact() -> None:
    cases = [
        {"ES": 1.0, "PS": 0.5, "NS": 1.0, "EM": 0.4, "PM": 0.1, "NM": 0.5, "EA": 1.0, "PA": 0.5, "NA": 1.0, "GE": 4.0},
        {"ES": 0.0, "PS": 1.0, "NS": 0.5, "EM": -0.2, "PM": 0.3, "NM": 0.1, "EA": 0.0, "PA": 1.0, "NA": 0.5, "GE": 2.0},
    ]
    agg = aggregate_cases(cases)
    assert agg["n_cases"] == 2
    assert (agg["ES"], agg["PS"], agg["NS"]) == (50.0, 75.0, 75.0)
    assert agg["EM"] == pytest.approx(10.0) and agg["NM"] == pytest.approx(30.0)
    assert agg["GE"] == 3.0
    assert agg["S"] == pytest.approx(3 / (1 / 50 + 1 / 75 + 1 / 75))
    # A case without paraphrases is skipped for PS, not counted as zero.
    agg = aggregate_cases([{"ES": 1.0, "PS": None, "NS": 1.0}, {"ES": 1.0, "PS": 0.5, "NS": 1.0}])
    assert agg["PS"] == 50.0


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    gen = torch.Generator().manual_seed(0)
    cases = [{"ES": float(x), "PS": float(y), "NS": 1.0} for x, y in torch.rand(40, 2, generator=gen).round().tolist()]
    a = bootstrap_intervals(cases, n_resamples=300, seed=3)
    b = bootstrap_intervals(cases, n_resamples=300, seed=3)
    assert a == b
    agg = aggregate_cases(cases)
    for key in ("ES", "PS", "S"):
        lo, hi = a[key]
        assert lo <= agg[key] <= hi and lo < hi


def test_scores_match_direct_forward(load_tiny) -> None:
    h = load_tiny("gpt2")
    tok = h.tokenizer
    prompt = encode_prompt(tok, "the capital of vel oran is")
    target = tok(" paris city", add_special_tokens=False)["input_ids"]  # two tokens: teacher forcing
    short = tok(" rome", add_special_tokens=False)["input_ids"]
    logp, top = score_continuations(h, [(prompt, target), (prompt, short)], batch_size=1)
    with torch.no_grad():
        ids = torch.tensor([prompt + target])
        lsm = torch.log_softmax(h.model(input_ids=ids).logits[0].double(), -1)
    manual = float(lsm[len(prompt) - 1, target[0]] + lsm[len(prompt), target[1]])
    assert float(logp[0]) == pytest.approx(manual, abs=1e-5)
    assert bool(top[0]) == bool(lsm[len(prompt) - 1].argmax() == target[0] and lsm[len(prompt)].argmax() == target[1])
    # Padding in a batch does not change the numbers.
    logp2, _ = score_continuations(h, [(prompt, target), (prompt, short)], batch_size=2)
    assert torch.allclose(logp, logp2, atol=1e-5)


def test_evaluate_rewrites_consistent(load_tiny) -> None:
    h = load_tiny("llama")
    rw = _rw(paraphrase_prompts=("one two the capital of vel oran is",),
             neighborhood_prompts=("the capital of tal mira is", "the capital of red fox is"),
             generation_prompts=("vel oran is", "the city of vel oran"))
    res = evaluate_rewrites(h, [rw, _rw(subject="tal mira")], batch_size=3, max_new_tokens=6, bootstrap=50)
    c = res.per_case[0]
    assert c["ES"] == float(c["rewrite_p_new"] > c["rewrite_p_true"])
    assert c["EM"] == pytest.approx(c["rewrite_p_new"] - c["rewrite_p_true"])
    assert len(c["generations"]) == 2 and c["GE"] is not None
    assert res.per_case[1]["PS"] is None  # no paraphrases
    assert res.aggregate["ES"] == pytest.approx(100 * (c["ES"] + res.per_case[1]["ES"]) / 2)
    again = evaluate_rewrites(h, [rw, _rw(subject="tal mira")], batch_size=3, max_new_tokens=6, bootstrap=50)
    assert again.aggregate == res.aggregate and again.per_case[0]["generations"] == c["generations"]


def test_evaluate_needs_target_true(load_tiny) -> None:
    h = load_tiny("gpt2")
    with pytest.raises(WorkbenchError, match="target_true"):
        evaluate_rewrites(h, [_rw(target_true=None)])
