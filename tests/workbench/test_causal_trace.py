"""Causal tracing: batched == the original scheme, restoration properties, plots, errors, CLI."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.workbench.causal_trace_reference import causal_trace_reference
from tests.zoo_models import factgpt
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.tracing import (
    BUCKETS,
    CausalTrace,
    average_indirect_effect,
    causal_trace,
    restored_probability,
    window_layers,
)

CAUSAL = ("gpt2", "gpt_neox", "llama")
PROMPT = "the capital of {} is"
SUBJECT = "vel oran"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def sharpen(handle: ModelHandle, seed: int = 1, std: float = 0.3) -> ModelHandle:
    """Redraw the matrices of a tiny random model with a larger std, so its next-token
    distribution is peaked and corrupting the subject moves it (default init is ~uniform)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in handle.model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return handle


@pytest.fixture(params=CAUSAL)
def sharp_lm(request: pytest.FixtureRequest, load_tiny: Callable[[str], ModelHandle]) -> ModelHandle:
    return sharpen(load_tiny(request.param))


def _no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_batched_equals_reference(sharp_lm: ModelHandle) -> None:
    fast = causal_trace(sharp_lm, PROMPT, SUBJECT, n_samples=3, window=3, seed=5)
    ref = causal_trace_reference(sharp_lm, PROMPT, SUBJECT, n_samples=3, window=3, seed=5)
    assert fast.kinds == ref.kinds == ("hidden", "mlp", "attn")
    assert abs(fast.corrupted_prob - ref.corrupted_prob) <= 1e-5
    assert fast.clean_prob == ref.clean_prob
    for kind in fast.kinds:
        assert fast.scores[kind].shape == (len(fast.tokens), sharp_lm.arch.n_layers)
        assert torch.allclose(fast.scores[kind], ref.scores[kind], atol=1e-5, rtol=0)
    # the comparison has something to compare: corruption moved the answer, restorations differ
    assert abs(fast.total_effect) > 1e-3
    assert float(fast.scores["hidden"].max() - fast.scores["hidden"].min()) > 1e-3


def test_chunking_does_not_change_numbers(sharp_lm: ModelHandle) -> None:
    one_pass = causal_trace(sharp_lm, PROMPT, SUBJECT, n_samples=4, window=2, batch_size=10_000)
    small = causal_trace(sharp_lm, PROMPT, SUBJECT, n_samples=4, window=2, batch_size=9)  # 2 restorations a pass
    for kind in one_pass.kinds:
        assert torch.allclose(one_pass.scores[kind], small.scores[kind], atol=1e-6, rtol=0)


@pytest.mark.parametrize("window", [1, 3, 10])
def test_skipping_redundant_rows_changes_nothing(window: int, load_tiny: Callable[[str], ModelHandle]) -> None:
    h = sharpen(load_tiny("gpt_neox"))
    full = causal_trace(h, "one two {} is", SUBJECT, n_samples=3, window=window, skip_redundant=False)
    lean = causal_trace(h, "one two {} is", SUBJECT, n_samples=3, window=window)
    assert full.corrupted_prob == pytest.approx(lean.corrupted_prob, abs=1e-7)
    for kind in full.kinds:
        assert torch.allclose(full.scores[kind], lean.scores[kind], atol=1e-6, rtol=0)


def test_restoring_a_whole_layer_gives_back_the_clean_probability(sharp_lm: ModelHandle) -> None:
    n_tokens = len(causal_trace(sharp_lm, PROMPT, SUBJECT, kinds="hidden", n_samples=2).tokens)
    layers = range(sharp_lm.arch.n_layers)
    everything = [[(f"blocks.{layer}.hook_resid_post", t) for t in range(n_tokens)] for layer in layers]
    probs = restored_probability(sharp_lm, PROMPT, SUBJECT, everything + [[]], n_samples=4, seed=3)
    trace = causal_trace(sharp_lm, PROMPT, SUBJECT, kinds="hidden", n_samples=4, seed=3)
    assert torch.allclose(probs[:-1], torch.full_like(probs[:-1], trace.clean_prob), atol=1e-5)
    assert abs(float(probs[-1]) - trace.corrupted_prob) <= 1e-6  # nothing restored = corrupted
    assert abs(trace.clean_prob - trace.corrupted_prob) > 1e-3


def test_tokens_before_the_subject_have_no_effect(sharp_lm: ModelHandle) -> None:
    # measured, not skipped: this property is what lets skip_redundant leave those rows out
    trace = causal_trace(sharp_lm, "one two {} is", SUBJECT, n_samples=3, window=2, skip_redundant=False)
    start = trace.subject_span[0]
    assert start == 2
    last = sharp_lm.arch.n_layers - 1
    for kind in trace.kinds:
        assert torch.all(trace.indirect_effect(kind)[:start].abs() <= 1e-6)  # already clean there
        if kind == "hidden":  # nothing after the final block mixes positions
            assert torch.all(trace.indirect_effect(kind)[:-1, last].abs() <= 1e-6)
    assert float(trace.indirect_effect("hidden")[start:].abs().max()) > 1e-3  # the rest is not all zero


def test_no_corruption_gives_zero_effects(sharp_lm: ModelHandle) -> None:
    trace = causal_trace(sharp_lm, PROMPT, SUBJECT, noise=0.0, n_samples=2, window=2)
    assert abs(trace.total_effect) <= 1e-6
    for kind in trace.kinds:
        assert float(trace.indirect_effect(kind).abs().max()) <= 1e-6


def test_seed_reproduces_and_differs(sharp_lm: ModelHandle) -> None:
    a = causal_trace(sharp_lm, PROMPT, SUBJECT, n_samples=3, window=2, seed=11)
    b = causal_trace(sharp_lm, PROMPT, SUBJECT, n_samples=3, window=2, seed=11)
    c = causal_trace(sharp_lm, PROMPT, SUBJECT, n_samples=3, window=2, seed=12)
    assert all(torch.equal(a.scores[k], b.scores[k]) for k in a.kinds)
    assert a.corrupted_prob == b.corrupted_prob
    assert a.corrupted_prob != c.corrupted_prob


def test_target_given_and_top1(load_tiny: Callable[[str], ModelHandle]) -> None:
    h = sharpen(load_tiny("gpt2"))
    top = causal_trace(h, PROMPT, SUBJECT, kinds=["hidden"], n_samples=2)
    assert top.target_id == top.predicted_id
    other = causal_trace(h, PROMPT, SUBJECT, target="paris", kinds=["hidden"], n_samples=2)
    assert other.target_id == h.tokenizer.convert_tokens_to_ids("paris")
    assert other.clean_prob < top.clean_prob


def test_hooks_gone_and_model_unchanged(sharp_lm: ModelHandle) -> None:
    ids = torch.tensor([sharp_lm.tokenizer("the capital of vel oran is")["input_ids"]])
    with torch.no_grad():
        before = sharp_lm.model(input_ids=ids).logits
    causal_trace(sharp_lm, PROMPT, SUBJECT, n_samples=2, window=2)
    causal_trace_reference(sharp_lm, PROMPT, SUBJECT, kinds="mlp", n_samples=2, window=2)
    assert _no_hooks(sharp_lm.model)
    with torch.no_grad():
        assert torch.equal(sharp_lm.model(input_ids=ids).logits, before)


def test_plots_and_json(tmp_path: Path, load_tiny: Callable[[str], ModelHandle]) -> None:
    h = sharpen(load_tiny("llama"))
    trace = causal_trace(h, PROMPT, SUBJECT, n_samples=2, window=2)
    paths = trace.plot(tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["trace_attn.png", "trace_hidden.png", "trace_mlp.png"]
    combined = trace.plot(tmp_path / "all.png")
    for p in [*paths, *combined]:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 1000
    saved = trace.save_json(tmp_path / "t.json")
    data = json.loads(saved.read_text())
    assert data["subject_span"] == [3, 5] and data["tokens"][3:5] == ["vel", "oran"]
    assert data["peaks"]["mlp"]["layer"] == trace.peak("mlp").layer
    back = CausalTrace.from_json(data)
    assert all(torch.allclose(back.scores[k], trace.scores[k]) for k in trace.kinds)
    assert back.total_effect == pytest.approx(trace.total_effect)


def test_peak_is_the_argmax(load_tiny: Callable[[str], ModelHandle]) -> None:
    h = sharpen(load_tiny("gpt2"))
    trace = causal_trace(h, PROMPT, SUBJECT, n_samples=2, window=2)
    for kind in trace.kinds:
        peak = trace.peak(kind)
        ie = trace.indirect_effect(kind)
        assert peak.effect == pytest.approx(float(ie.max()))
        assert float(ie[peak.token, peak.layer]) == pytest.approx(float(ie.max()))
        assert peak.token_text == trace.tokens[peak.token]


@pytest.mark.parametrize("layer,window,n_layers,expected", [
    (0, 10, 48, range(0, 5)), (20, 10, 48, range(15, 25)), (47, 10, 48, range(42, 48)),
    (3, 1, 12, range(3, 4)), (2, 3, 4, range(1, 4)), (1, 10, 2, range(0, 2)),
])
def test_window_layers_clip_like_rome(layer: int, window: int, n_layers: int, expected: range) -> None:
    assert window_layers(layer, window, n_layers) == expected


def test_average_indirect_effect(tmp_path: Path, load_tiny: Callable[[str], ModelHandle]) -> None:
    h = sharpen(load_tiny("gpt2"))
    cases = [("the capital of {} is", "vel oran"), ("{} is in the north", "tal mira"),
             {"prompt": "the river of {} is", "subject": "rome"}]
    avg = average_indirect_effect(h, cases, n_samples=2, window=2)
    assert avg.buckets == BUCKETS and avg.n_facts == 3 and avg.n_skipped == 0
    for kind in avg.kinds:
        assert avg.effects[kind].shape == (len(BUCKETS), h.arch.n_layers)
    # "vel oran"/"tal mira" are 2 tokens (no middle), "rome" 1: middle subject bucket is empty
    assert avg.counts[0] == 3 and avg.counts[1] == 0 and avg.counts[2] == 3 and avg.counts[5] == 3
    assert torch.isnan(avg.effects["mlp"][1]).all()
    single = causal_trace(h, *cases[0], n_samples=2, window=2)
    assert avg.mean_clean_prob > 0 and single.clean_prob > 0
    json.dumps(avg.to_json())
    path = avg.plot(tmp_path / "avg.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_average_known_only_skips_unknown(load_tiny: Callable[[str], ModelHandle]) -> None:
    h = sharpen(load_tiny("gpt2"))
    top = causal_trace(h, PROMPT, SUBJECT, kinds="hidden", n_samples=2)
    wrong = "paris" if top.target.strip() != "paris" else "rome"
    avg = average_indirect_effect(h, [(PROMPT, SUBJECT, top.target.strip()), (PROMPT, SUBJECT, wrong)],
                                  kinds="hidden", n_samples=2)
    assert (avg.n_facts, avg.n_skipped) == (1, 1)
    with pytest.raises(WorkbenchError, match="known"):
        average_indirect_effect(h, [(PROMPT, SUBJECT, wrong)], kinds="hidden", n_samples=2)


# --- bad input ------------------------------------------------------------------------------

def test_subject_not_in_prompt_lists_tokens(load_tiny: Callable[[str], ModelHandle]) -> None:
    with pytest.raises(WorkbenchError, match=r"not in the prompt.*'capital'"):
        causal_trace(load_tiny("gpt2"), "the capital of rome is", "paris")


def test_unknown_kind(load_tiny: Callable[[str], ModelHandle]) -> None:
    with pytest.raises(WorkbenchError, match="valid kinds: hidden, mlp, attn"):
        causal_trace(load_tiny("gpt2"), PROMPT, SUBJECT, kinds=("hidden", "resid"))


def test_family_without_site_map(cnn_handle: ModelHandle) -> None:
    with pytest.raises(WorkbenchError, match="(?i)supported families: .*gpt2.*llama"):
        causal_trace(cnn_handle, PROMPT, SUBJECT)


def test_masked_lm_refused(load_tiny: Callable[[str], ModelHandle]) -> None:
    with pytest.raises(WorkbenchError, match="causal language models"):
        causal_trace(load_tiny("bert"), PROMPT, SUBJECT)


@pytest.mark.parametrize("option", [{"noise": -1.0}, {"n_samples": 0}, {"window": 0}, {"batch_size": 0}])
def test_bad_options(option: dict, load_tiny: Callable[[str], ModelHandle]) -> None:
    with pytest.raises(WorkbenchError):
        causal_trace(load_tiny("gpt2"), PROMPT, SUBJECT, **option)


# --- CLI --------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    from workbench_cli.locate import add_parsers as add_locate_parsers

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true")
        p.add_argument("--device", default="cpu")
        p.add_argument("--cache", default=None)
        p.add_argument("-v", "--verbose", action="store_true")

    def emit(args: argparse.Namespace, result: object, text: Callable[[object], str]) -> None:
        sys.stdout.write((json.dumps(result, default=str) if args.json else text(result)) + "\n")

    parser = argparse.ArgumentParser(prog="workbench")
    add_locate_parsers(parser.add_subparsers(dest="command"), common, emit)
    return parser


def test_cli_trace(tmp_path: Path, tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model = str(tiny_model_dirs["gpt_neox"])
    out = tmp_path / "t"
    args = _parser().parse_args(["trace", model, "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "2",
                                 "--window", "2", "--out", str(out), "--json"])
    args.func(args)
    doc = json.loads(capsys.readouterr().out)
    assert {p.name for p in out.iterdir()} == {"trace.json", "trace_hidden.png", "trace_mlp.png", "trace_attn.png"}
    assert set(doc["peaks"]) == {"hidden", "mlp", "attn"} and doc["n_samples"] == 2
    assert json.loads((out / "trace.json").read_text())["scores"] == doc["scores"]

    args = _parser().parse_args(["trace", model, "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "2",
                                 "--kinds", "mlp", "--out", str(tmp_path / "u")])
    args.func(args)
    text = capsys.readouterr().out
    assert "total effect" in text and "mlp    peak: layer" in text and "hidden" not in text


def test_cli_trace_bad_subject(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    args = _parser().parse_args(["trace", str(tiny_model_dirs["gpt2"]), "--prompt", "the capital of rome is",
                                 "--subject", "paris", "--out", str(tmp_path / "t")])
    with pytest.raises(WorkbenchError, match="tokens"):
        args.func(args)
    assert not (tmp_path / "t").exists()


# --- FactGPT (slow; the zoo model trains on first use) --------------------------------------

def _factgpt() -> ModelHandle:
    return factgpt()


@pytest.mark.slow
def test_factgpt_trace_batched_equals_reference_and_mlp_peaks() -> None:
    h = _factgpt()
    world = h.info["world"]
    records = world.counterfact_records(20, seed=0)
    rw = records[0]["requested_rewrite"]
    fast = causal_trace(h, rw["prompt"], rw["subject"], target=rw["target_true"]["str"])
    ref = causal_trace_reference(h, rw["prompt"], rw["subject"], target=rw["target_true"]["str"])
    assert max(float((fast.scores[k] - ref.scores[k]).abs().max()) for k in fast.kinds) <= 1e-5
    avg = average_indirect_effect(h, records, kinds="mlp")
    assert avg.n_facts >= 10  # FactGPT knows its facts
    assert avg.mean_total_effect > 0.1  # corrupting the subject hurts the answer
    # Where the MLP peak sits is reported, not forced (see benchmarks/RESULTS.md); it must be a
    # subject or last token, never a token before the subject (those have zero effect).
    buckets = [p["mlp"]["bucket"] for p in avg.peaks]
    assert all(b in BUCKETS for b in buckets)
