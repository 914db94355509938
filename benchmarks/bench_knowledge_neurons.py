"""Knowledge-neuron attribution, one prompt and one layer: one batched captum IG pass over all
neurons vs the unbatched per-neuron loop (one pass over the integration steps per neuron).

The loop is timed on `--neurons` neurons and extrapolated linearly to the whole layer; the
extrapolation is labelled as such. The largest difference on the timed neurons is printed.

    .venv/bin/python benchmarks/bench_knowledge_neurons.py [--model zoo:factgpt] [--layer 2] [--neurons 64]

`--suppress N` instead attributes N facts (rewrite prompt + 2 paraphrases, all layers), zeroes
the top-k attributed neurons at the last position and compares the relative drop of the
answer's probability with zeroing k random neurons (the paper's control).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from tests.workbench.knowledge_neurons_reference import attribute_neurons_reference
from workbench.handle import ModelHandle
from workbench.hooks import patch
from workbench.knowledge_neurons import KnowledgeNeuron, attribute_neurons
from workbench.models import load


def _prob(handle: ModelHandle, prompt: str, target_id: int, by_layer: dict[int, list[int]]) -> float:
    ids = torch.tensor([handle.tokenizer(prompt)["input_ids"]], device=handle.device)

    def zero(neurons: list[int]) -> Any:
        idx = torch.tensor(neurons, dtype=torch.long)

        def fn(act: torch.Tensor) -> torch.Tensor:
            new = act.clone()
            new[:, -1, idx.to(act.device)] = 0
            return new

        return fn

    with torch.no_grad(), patch(handle, {f"blocks.{layer}.mlp.hook_post": zero(ns) for layer, ns in by_layer.items()}):
        logits = handle.model(input_ids=ids).logits
    return float(torch.softmax(logits[0, -1].float(), -1)[target_id])


def suppress(handle: ModelHandle, args: argparse.Namespace) -> None:
    records = handle.info["world"].counterfact_records(args.suppress, seed=1)
    gen = torch.Generator().manual_seed(0)
    drops: dict[str, list[float]] = {"top-k by mean attribution": [], "refined (threshold+share), up to k": [],
                                     "random k (control)": []}
    n_refined = []
    t0 = time.perf_counter()
    for record in records:
        rw = record["requested_rewrite"]
        prompts = [rw["prompt"].format(rw["subject"]), *record["paraphrase_prompts"][:2]]
        attr = attribute_neurons(handle, prompts, rw["target_true"]["str"], steps=args.steps)
        n_refined.append(len(attr.neurons))
        before = _prob(handle, prompts[0], attr.target_id, {})
        d_mlp = attr.scores.shape[2]
        randoms = [KnowledgeNeuron(int(torch.randint(0, handle.arch.n_layers, (1,), generator=gen)),
                                   int(torch.randint(0, d_mlp, (1,), generator=gen)), 0.0) for _ in range(args.k)]
        for key, chosen in zip(drops, (attr.ranked(args.k), attr.top(args.k), randoms)):
            by_layer: dict[int, list[int]] = {}
            for n in chosen:
                by_layer.setdefault(n.layer, []).append(n.neuron)
            drops[key].append((before - _prob(handle, prompts[0], attr.target_id, by_layer)) / before)
    elapsed = time.perf_counter() - t0
    print(f"{len(records)} facts x 3 prompts, all {handle.arch.n_layers} layers, {args.steps} steps: {elapsed:.1f} s; "
          f"refined neurons per fact: mean {statistics.mean(n_refined):.1f} (min {min(n_refined)}, max {max(n_refined)})")
    for key, values in drops.items():
        print(f"    {key:<36} relative drop of p(answer): mean {statistics.mean(values):7.2%}, "
              f"median {statistics.median(values):7.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:factgpt")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", type=int, default=0, help="which FactWorld CounterFact record (seed 0)")
    parser.add_argument("--layer", type=int, default=None, help="default: the middle layer")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--neurons", type=int, default=64, help="neurons timed in the per-neuron loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--suppress", type=int, default=0, help="suppression experiment over N facts instead")
    parser.add_argument("--k", type=int, default=5, help="neurons zeroed per fact in --suppress")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    handle = load(args.model, device=args.device, progress=False)
    if args.suppress:
        suppress(handle, args)
        return
    record = handle.info["world"].counterfact_records(args.case + 1, seed=0)[args.case]
    rw = record["requested_rewrite"]
    prompt, target = rw["prompt"].format(rw["subject"]), rw["target_true"]["str"]
    layer = handle.arch.n_layers // 2 if args.layer is None else args.layer

    attribute_neurons(handle, prompt, target, layers=[layer], steps=args.steps)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        attr = attribute_neurons(handle, prompt, target, layers=[layer], steps=args.steps)
        times.append(time.perf_counter() - t0)
    d_mlp = attr.scores.shape[2]
    some = list(range(min(args.neurons, d_mlp)))
    t0 = time.perf_counter()
    ref = attribute_neurons_reference(handle, prompt, target, layer, neurons=some, steps=args.steps)
    loop_time = time.perf_counter() - t0
    per_neuron = loop_time / len(some)
    full_loop = per_neuron * d_mlp
    best = min(times)
    diff = float((attr.scores[0, 0, some] - ref).abs().max())
    rows = [
        ("model", f"{args.model} (layer {layer} of {handle.arch.n_layers}, {d_mlp} neurons, {torch.get_num_threads()} threads)"),
        ("prompt", f"{prompt!r} -> {attr.target!r} (p = {attr.probs[0]:.4f})"),
        ("batched IG (s)", f"{best:.4f} for all {d_mlp} neurons, {args.steps} steps in one pass "
                           f"(best of {args.repeats}: {', '.join(f'{t:.4f}' for t in times)}; includes captum's convergence-delta pass)"),
        ("per-neuron loop (s)", f"{loop_time:.3f} measured for {len(some)} neurons ({per_neuron * 1000:.2f} ms/neuron)"),
        ("per-neuron loop, whole layer", f"{full_loop:.2f} s EXTRAPOLATED ({per_neuron * 1000:.2f} ms x {d_mlp})"),
        ("speedup", f"{full_loop / best:.0f}x (extrapolated loop / measured batched)"),
        ("max abs diff", f"{diff:.2e} on the {len(some)} timed neurons"),
        ("convergence delta", f"{float(attr.deltas[0, 0]):.2e} (sum of attributions - (f(x) - f(0)))"),
        ("top neurons", ", ".join(f"{n.neuron} ({n.score:.3g})" for n in attr.ranked(5))),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
