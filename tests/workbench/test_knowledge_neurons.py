"""Knowledge-neuron attribution: captum IG batched == per-neuron oracle, completeness,
the paper's threshold/share refinement, errors, CLI, and the suppression effect on FactGPT."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.workbench.knowledge_neurons_reference import attribute_neurons_reference
from tests.zoo_models import factgpt
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.hooks import patch
from workbench.knowledge_neurons import KnowledgeNeuron, attribute_neurons, refine_neurons

CAUSAL = ("gpt2", "gpt_neox", "llama")
PROMPT = "the capital of vel oran is"
PARAPHRASES = [PROMPT, "vel oran capital is", "in vel oran the capital is"]


def sharpen(handle: ModelHandle, seed: int = 1, std: float = 0.3) -> ModelHandle:
    """Larger random weights than the default init, so probabilities depend on the neurons."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in handle.model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return handle


@pytest.fixture(params=CAUSAL)
def sharp_lm(request: pytest.FixtureRequest, load_tiny: Callable[[str], ModelHandle]) -> ModelHandle:
    return sharpen(load_tiny(request.param))


def _prob(handle: ModelHandle, prompt: str, target_id: int, *, zero_layer: int | None = None,
          neurons: list[int] | None = None) -> float:
    """P(target) with (optionally) some last-position MLP neurons of one layer zeroed."""
    ids = torch.tensor([handle.tokenizer(prompt)["input_ids"]])
    patches = {}
    if zero_layer is not None:
        idx = torch.tensor(neurons if neurons is not None else [], dtype=torch.long)

        def zero(act: torch.Tensor) -> torch.Tensor:
            new = act.clone()
            if neurons is None:
                new[:, -1] = 0
            else:
                new[:, -1, idx] = 0
            return new

        patches[f"blocks.{zero_layer}.mlp.hook_post"] = zero
    with torch.no_grad(), patch(handle, patches):
        logits = handle.model(input_ids=ids).logits
    return float(torch.softmax(logits[0, -1].float(), -1)[target_id])


def test_batched_equals_per_neuron_reference(sharp_lm: ModelHandle) -> None:
    attr = attribute_neurons(sharp_lm, PROMPT, "paris", layers=[1], steps=8)
    some = [0, 3, 17, 40, 63]
    ref = attribute_neurons_reference(sharp_lm, PROMPT, "paris", 1, neurons=some, steps=8)
    got = attr.scores[0, 0, some]
    assert torch.allclose(got, ref, atol=1e-7, rtol=1e-4)
    assert float(got.abs().max()) > 1e-5  # non-trivial attributions


def test_completeness_matches_captum_delta(sharp_lm: ModelHandle) -> None:
    target_id = sharp_lm.tokenizer.convert_tokens_to_ids("paris")
    for layer in range(sharp_lm.arch.n_layers):
        clean = _prob(sharp_lm, PROMPT, target_id)
        zeroed = _prob(sharp_lm, PROMPT, target_id, zero_layer=layer)
        assert abs(clean - zeroed) > 1e-5  # the layer matters at all
        # the paper's 20-step Riemann sum: captum's delta is exactly sum - (f(x) - f(0))
        attr = attribute_neurons(sharp_lm, PROMPT, "paris", layers=[layer], steps=20)
        total = float(attr.scores[0, 0].sum())
        assert float(attr.deltas[0, 0]) == pytest.approx(total - (clean - zeroed), abs=1e-6)
        assert attr.probs[0] == pytest.approx(clean, abs=1e-7)
        # a converged quadrature: IG sums to f(x) - f(baseline)
        fine = attribute_neurons(sharp_lm, PROMPT, "paris", layers=[layer], steps=64, method="gausslegendre")
        assert float(fine.scores[0, 0].sum()) == pytest.approx(clean - zeroed, rel=1e-3, abs=1e-6)
        assert abs(float(fine.deltas[0, 0])) <= 1e-3 * abs(clean - zeroed) + 1e-6


def test_refine_threshold_and_share() -> None:
    # 3 prompts, layers (4, 7), 5 neurons. Max per prompt: 10, 5, 2.
    scores = torch.zeros(3, 2, 5)
    scores[0, 0] = torch.tensor([10.0, 2.5, 1.0, 0.0, -3.0])  # keeps > 2.0: (4,0), (4,1)
    scores[0, 1] = torch.tensor([0.0, 3.0, 0.0, 2.0, 0.0])  # (7,1); 2.0 is not > 2.0
    scores[1, 0] = torch.tensor([5.0, 0.5, 0.0, 0.0, 0.0])  # > 1.0: (4,0)
    scores[1, 1] = torch.tensor([0.0, 4.0, 0.0, 0.0, 1.5])  # (7,1), (7,4)
    scores[2, 0] = torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0])  # > 0.4: (4,0)
    scores[2, 1] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])  # (7,4)
    neurons, kept = refine_neurons(scores, (4, 7), threshold=0.2, share=0.5)
    assert kept[0] == ((4, 0), (4, 1), (7, 1))
    assert kept[1] == ((4, 0), (7, 1), (7, 4))
    assert kept[2] == ((4, 0), (7, 4))
    # shared by >= 2 of 3 prompts, ranked by mean score: (4,0) 17/3, (7,1) 7/3, (7,4) 2.5/3
    assert [(n.layer, n.neuron) for n in neurons] == [(4, 0), (7, 1), (7, 4)]
    assert neurons[0].score == pytest.approx(17 / 3)
    everywhere, _ = refine_neurons(scores, (4, 7), threshold=0.2, share=1.0)
    assert [(n.layer, n.neuron) for n in everywhere] == [(4, 0)]
    # threshold 0.5: prompt 0 keeps only (4,0) (3.0 is not > 5.0); (7,1) survives in prompt 1 only
    strict, strict_kept = refine_neurons(scores, (4, 7), threshold=0.5, share=0.5)
    assert strict_kept == (((4, 0),), ((4, 0), (7, 1)), ((4, 0),))
    assert [(n.layer, n.neuron) for n in strict] == [(4, 0)]
    negative, kept_neg = refine_neurons(-scores.abs() - 1, (4, 7))
    assert negative == () and kept_neg == ((), (), ())


def test_attribution_object(load_tiny: Callable[[str], ModelHandle]) -> None:
    h = sharpen(load_tiny("gpt2"))
    attr = attribute_neurons(h, PARAPHRASES, "paris", steps=6, threshold=0.2, share=0.5)
    assert attr.scores.shape == (3, h.arch.n_layers, 128) and attr.deltas.shape == (3, h.arch.n_layers)
    assert attr.target == "paris" and attr.layers == (0, 1)
    assert len(attr.neurons) > 0
    layer, neuron, score = attr.top(1)[0]  # unpacks as (layer, neuron, score)
    assert isinstance(attr.top(1)[0], KnowledgeNeuron)
    assert score == pytest.approx(float(attr.mean_scores[attr.layers.index(layer), neuron]))
    assert [n.score for n in attr.neurons] == sorted((n.score for n in attr.neurons), reverse=True)
    assert attr.ranked(1)[0].score == pytest.approx(float(attr.mean_scores.max()))
    assert sum(len(v) for v in attr.by_layer().values()) == len(attr.neurons)
    doc = json.loads(json.dumps(attr.to_json()))
    assert len(doc["per_prompt"]) == 3 and doc["neurons"][0]["layer"] == layer


def test_hooks_gone_after_attribution(sharp_lm: ModelHandle) -> None:
    attribute_neurons(sharp_lm, PROMPT, "paris", layers=[0], steps=4)
    attribute_neurons_reference(sharp_lm, PROMPT, "paris", 0, neurons=[1], steps=4)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in sharp_lm.model.modules())
    assert all(p.grad is None for p in sharp_lm.model.parameters())


@pytest.mark.parametrize("kwargs,match", [
    ({"layers": [5]}, "out of range"),
    ({"steps": 0}, "steps"),
    ({"threshold": 1.5}, "threshold"),
    ({"share": -0.1}, "share"),
    ({"method": "simpson"}, "method"),
])
def test_bad_options(kwargs: dict, match: str, load_tiny: Callable[[str], ModelHandle]) -> None:
    with pytest.raises(WorkbenchError, match=match):
        attribute_neurons(load_tiny("gpt2"), PROMPT, "paris", **kwargs)


def test_bad_target_and_model(load_tiny: Callable[[str], ModelHandle], cnn_handle: ModelHandle) -> None:
    with pytest.raises(WorkbenchError, match="is empty"):
        attribute_neurons(load_tiny("gpt2"), PROMPT, "   ")
    with pytest.raises(WorkbenchError, match="(?i)supported families"):
        attribute_neurons(cnn_handle, PROMPT, "paris")


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


def test_cli_neurons(tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model = str(tiny_model_dirs["llama"])
    argv = ["neurons", model, "--prompt", PARAPHRASES[0], "--prompt", PARAPHRASES[1], "--target", "paris",
            "--layers", "0-1", "--steps", "4", "--top", "3"]
    args = _parser().parse_args(argv + ["--json"])
    args.func(args)
    doc = json.loads(capsys.readouterr().out)
    assert doc["layers"] == [0, 1] and len(doc["prompts"]) == 2 and doc["steps"] == 4
    assert len(doc["top"]) <= 3 and len(doc["top_unrefined"]) == 3
    args = _parser().parse_args(argv)
    args.func(args)
    assert "layer" in capsys.readouterr().out


def test_cli_neurons_bad_layers(tiny_model_dirs: dict[str, Path]) -> None:
    args = _parser().parse_args(["neurons", str(tiny_model_dirs["gpt2"]), "--prompt", PROMPT, "--target", "paris",
                                 "--layers", "0-9"])
    with pytest.raises(WorkbenchError, match=r"out of range; this model has layers 0..1"):
        args.func(args)


def test_parse_layers() -> None:
    from workbench_cli.locate import parse_layers

    assert parse_layers("0-2,5") == [0, 1, 2, 5] and parse_layers(None) is None and parse_layers("all") is None
    with pytest.raises(WorkbenchError):
        parse_layers("x")
    with pytest.raises(WorkbenchError):
        parse_layers("3-1")


# --- FactGPT (slow; the zoo model trains on first use) --------------------------------------

def _factgpt() -> ModelHandle:
    return factgpt()


@pytest.mark.slow
def test_factgpt_suppressing_top_neurons_beats_random() -> None:
    h = _factgpt()
    world = h.info["world"]
    records = world.counterfact_records(12, seed=1)
    k = 5
    gen = torch.Generator().manual_seed(0)
    drops_top, drops_random = [], []
    for record in records:
        rw = record["requested_rewrite"]
        prompts = [rw["prompt"].format(rw["subject"]), *record["paraphrase_prompts"][:2]]
        target = rw["target_true"]["str"]
        attr = attribute_neurons(h, prompts, target)
        chosen = attr.ranked(k)
        target_id = attr.target_id
        before = _prob(h, prompts[0], target_id)
        by_layer: dict[int, list[int]] = {}
        for n in chosen:
            by_layer.setdefault(n.layer, []).append(n.neuron)
        d_mlp = attr.scores.shape[2]
        random_layers = torch.randint(0, h.arch.n_layers, (k,), generator=gen).tolist()
        random_by_layer: dict[int, list[int]] = {}
        for layer in random_layers:
            random_by_layer.setdefault(layer, []).append(int(torch.randint(0, d_mlp, (1,), generator=gen)))
        drops_top.append((before - _prob_many(h, prompts[0], target_id, by_layer)) / before)
        drops_random.append((before - _prob_many(h, prompts[0], target_id, random_by_layer)) / before)
    mean_top = sum(drops_top) / len(drops_top)
    mean_random = sum(drops_random) / len(drops_random)
    assert mean_top > mean_random


def _prob_many(handle: ModelHandle, prompt: str, target_id: int, by_layer: dict[int, list[int]]) -> float:
    ids = torch.tensor([handle.tokenizer(prompt)["input_ids"]])

    def zero(neurons: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        idx = torch.tensor(neurons, dtype=torch.long)

        def fn(act: torch.Tensor) -> torch.Tensor:
            new = act.clone()
            new[:, -1, idx] = 0
            return new

        return fn

    patches = {f"blocks.{layer}.mlp.hook_post": zero(ns) for layer, ns in by_layer.items()}
    with torch.no_grad(), patch(handle, patches):
        logits = handle.model(input_ids=ids).logits
    return float(torch.softmax(logits[0, -1].float(), -1)[target_id])
