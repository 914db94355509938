"""Circuit discovery, MIB-style: CPR and CMD of EAP, EAP-IG and ACDC beside random circuits, and runtime.

    .venv/bin/python benchmarks/bench_circuits.py --out benchmarks/out/circuits/results.json
    .venv/bin/python benchmarks/bench_circuits.py --seeds "" --scaling 2,4,8,12 \
        --out benchmarks/out/circuits/scaling.json          # edge-level EAP on GPT-2-small-size models

On zoo FactGPT fact recall (edge and node level) and one ShapesNet trojan (channel nodes), for
each task seed (which pairs are drawn; the random circuits use it too): every method's CPR,
CMD, the circuit it keeps and the seconds it took (one CPU thread), beside random circuits of
the same sizes; then EAP-IG against ACDC (score difference, time ratio). `--scaling` also times
edge-level EAP and EAP-IG on random-weight GPT-2 models of GPT-2 small's width (768, 12 heads)
with that many layers, each in a fresh process so its peak memory is its own (fastest of 3 runs).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

METHODS = ("eap", "eap-ig", "acdc", "mask")
KEYS = ("cpr", "cmd", "random_cpr", "random_cmd", "faithfulness", "seconds", "search_seconds")


def _cases(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    cases = [("zoo:factgpt", "facts", level) for level in args.levels.split(",")]
    if args.trojan:
        cases.append(("zoo:shapesnet", f"trojan:{args.trojan}", "node"))
    return cases


def _run_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    from workbench.circuits import DiscoveryConfig, find_circuit, task_for
    from workbench.models import load

    rows = []
    handles: dict[str, Any] = {}
    for spec, task_name, level in _cases(args):
        handle = handles.setdefault(spec, load(spec, device="cpu", progress=False))
        for seed in [int(s) for s in args.seeds.split(",")]:
            task = task_for(handle, task_name, n=args.n, seed=seed)
            for method in METHODS:
                config = DiscoveryConfig(method=method, level=level, steps=args.steps, threshold=args.threshold,
                                         random_draws=args.random_draws, seed=seed)
                circuit = find_circuit(handle, task, config)
                r = circuit.results
                row = {"model": spec, "task": task_name, "level": level, "seed": seed, "method": method,
                       "components": len(circuit.components), "kept": sum(circuit.kept),
                       "nodes": len(circuit.nodes), "edges": len(circuit.edges), **{k: r[k] for k in KEYS},
                       "curve": r["curve"], "cpr_curve": r["cpr_curve"], "random_curve": r["random_curve"]}
                rows.append(row)
                print(f"{spec:14} {task_name:24} {level:4} seed {seed} {method:6}  CPR {r['cpr']:.3f} "
                      f"(random {r['random_cpr']:.3f})  CMD {r['cmd']:.3f} (random {r['random_cmd']:.3f})  "
                      f"kept {sum(circuit.kept):4}/{len(circuit.components):<4}  f {r['faithfulness']:.3f}  "
                      f"{r['seconds']:.2f} s", flush=True)
    return rows


def _mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


def _summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    groups = sorted({(r["model"], r["task"], r["level"]) for r in rows})
    for model, task, level in groups:
        per = {m: [r for r in rows if (r["model"], r["task"], r["level"], r["method"]) == (model, task, level, m)]
               for m in METHODS}
        entry: dict[str, Any] = {"model": model, "task": task, "level": level, "seeds": len(per["eap"]),
                                 "components": per["eap"][0]["components"]}
        for m, rs in per.items():
            entry[m] = {k: _mean_sd([r[k] for r in rs]) for k in (*KEYS, "kept")}
        entry["random"] = {k: _mean_sd([r[k] for r in per["eap"]]) for k in ("random_cpr", "random_cmd")}
        ig, ac = per["eap-ig"], per["acdc"]
        entry["eap_ig_vs_acdc"] = {
            "cpr_difference": _mean_sd([a["cpr"] - b["cpr"] for a, b in zip(ig, ac)]),
            "cmd_difference": _mean_sd([a["cmd"] - b["cmd"] for a, b in zip(ig, ac)]),
            "acdc_over_eap_ig_seconds": _mean_sd([b["seconds"] / a["seconds"] for a, b in zip(ig, ac)]),
            "acdc_over_eap_ig_search_seconds": _mean_sd([b["seconds"] / a["search_seconds"] for a, b in zip(ig, ac)]),
        }
        out.append(entry)
    return out


def _scaling_one(layers: int, batch: int, seq: int, steps: int, queue: Any) -> None:
    """One GPT-2-small-width model with `layers` layers: edges, seconds and peak memory of EAP and EAP-IG."""
    torch.set_num_threads(1)
    from transformers import GPT2Config, GPT2LMHeadModel

    from workbench.circuits import CircuitRunner, CircuitTask, LogitDifference, component_graph
    from workbench.circuits.attribution import edge_scores
    from workbench.models import wrap_hf_model

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)).eval()
    handle = wrap_hf_model(model, None, spec=f"random-gpt2-{layers}l", kind="causal_lm")
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 50257, (batch, seq), generator=g)
    corrupted = clean.clone()
    corrupted[:, seq // 2] = torch.randint(0, 50257, (batch,), generator=g)
    metric = LogitDifference(torch.full((batch,), seq - 1), torch.randint(0, 50257, (batch,), generator=g),
                             torch.randint(0, 50257, (batch,), generator=g))
    task = CircuitTask("random", {"input_ids": clean}, {"input_ids": corrupted}, metric)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    graph = component_graph(handle)
    runner = CircuitRunner(handle, graph, task)
    runner.clean_nodes()
    runner.corrupted_nodes()

    def best_of(fn: Any, repeats: int = 3) -> float:  # the machine is shared: the fastest of a few runs
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    eap = best_of(lambda: edge_scores(runner, steps=1))
    ig = best_of(lambda: edge_scores(runner, steps=steps))
    forward = best_of(lambda: runner.run_nodes(torch.ones(len(graph.nodes), dtype=torch.bool)))
    patched = best_of(lambda: runner.run(torch.zeros(len(graph.edges), dtype=torch.bool), "edge"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put({"layers": layers, "edges": len(graph.edges), "nodes": len(graph.nodes), "batch": batch, "seq": seq,
               "eap_seconds": round(eap, 3), "eap_ig_seconds": round(ig, 3), "eap_ig_steps": steps,
               "forward_seconds": round(forward, 3), "edge_patched_forward_seconds": round(patched, 3),
               "peak_rss_mb": round(peak / 1024, 1), "rss_before_scoring_mb": round(before / 1024, 1)})


def _scaling(layer_counts: list[int], *, batch: int, seq: int, steps: int) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for layers in layer_counts:
        queue = ctx.Queue()
        proc = ctx.Process(target=_scaling_one, args=(layers, batch, seq, steps, queue))
        proc.start()
        row = queue.get()
        proc.join()
        rows.append(row)
        print(f"GPT-2 width, {layers:2} layers: {row['edges']:5} edges  EAP {row['eap_seconds']:.2f} s  "
              f"EAP-IG({steps}) {row['eap_ig_seconds']:.2f} s  plain forward {row['forward_seconds']:.2f} s  "
              f"all edges patched {row['edge_patched_forward_seconds']:.2f} s"
              f"  peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="task seeds (which pairs; random circuits too)")
    ap.add_argument("--n", type=int, default=32, help="pairs per task")
    ap.add_argument("--levels", default="edge,node", help="FactGPT levels")
    ap.add_argument("--trojan", default="patch-universal", help="ShapesNet trojan ('' to skip)")
    ap.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    ap.add_argument("--threshold", type=float, default=0.01, help="ACDC threshold (share of the behaviour)")
    ap.add_argument("--random-draws", type=int, default=5)
    ap.add_argument("--scaling", default="", help="comma-separated layer counts for the GPT-2-size timing (e.g. 2,4,8,12)")
    ap.add_argument("--scaling-batch", type=int, default=8)
    ap.add_argument("--scaling-seq", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/out/circuits/results.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from workbench.storage import atomic_write_json

    rows = _run_cases(args) if args.seeds else []
    summary = _summary(rows) if rows else []
    for s in summary:
        d = s["eap_ig_vs_acdc"]
        print(f"{s['model']} {s['task']} {s['level']}: EAP-IG - ACDC CPR {d['cpr_difference']['mean']:+.3f} "
              f"(sd {d['cpr_difference']['sd']:.3f}), CMD {d['cmd_difference']['mean']:+.3f}; ACDC takes "
              f"{d['acdc_over_eap_ig_seconds']['mean']:.1f}x EAP-IG's time to a circuit "
              f"({d['acdc_over_eap_ig_search_seconds']['mean']:.1f}x its scoring time)")
    scaling = _scaling([int(x) for x in args.scaling.split(",")], batch=args.scaling_batch, seq=args.scaling_seq,
                       steps=args.steps) if args.scaling else []
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "threads": 1,
              "torch": torch.__version__, "summary": summary, "runs": rows, "scaling": scaling}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
