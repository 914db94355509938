"""Trojan surgery by circuit ablation on ShapesNet, beside a random-channel control (and the unit gates in RESULTS).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_circuit_surgery.py --seeds 0 --methods eap-ig,acdc \
        --out benchmarks/out/circuit_surgery/seed0.json

For each trojan and seed: a node-level circuit over the channels of the trojan-surgery sites
(`SURGERY_SITES`, the 224 ReLU channels the unit gates choose among) is found on `trojan:NAME`
(the scene with and without its trigger, `--n` pairs drawn with the seed) by EAP-IG or ACDC;
its channels are ordered by signed score (the ones that push the target logit up first); k is
chosen on the protocol's selection scenes (seed: triggered scenes and clean scenes, the same
clean scenes the means come from): the lowest selection attack success whose clean cost is
within `--clean-budget`, then the fewest channels. The top-k channels are mean-ablated as one
folded `WeightDelta` (`editors.circuit_ablation`) and measured on the evaluation scenes (seed +
1000: 500 triggered, 1000 clean, the unit benchmark's scenes), beside as many random channels
per site (run-time hook, `--draws` seeded draws) and beside the circuit as found (its kept
channels). Target, as for the unit editors: >= 0.90 relative cut of attack success at <= 1 point
of clean accuracy. Each case is written as soon as it ends; a rerun skips cases already there.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

TROJANS = ("patch-universal", "patch-square", "style-universal", "style-star", "natural-universal", "natural-circle")


def _case_result(handle: Any, trojan: str, seed: int, method: str, case: Any, args: argparse.Namespace) -> dict[str, Any]:
    from editors.circuit_ablation import (
        CircuitAblation,
        CircuitAblationRequest,
        ablation_hook,
        circuit_nodes,
        node_ranking,
        random_nodes,
        resolve_ablation,
    )
    from workbench.circuits import DiscoveryConfig, find_circuit, trojan_task
    from workbench.circuits.components import cnn_graph
    from workbench_protocols.surgery import MASK_KS, SURGERY_SITES

    graph = cnn_graph(handle, list(SURGERY_SITES))
    start = time.perf_counter()
    task = trojan_task(handle, trojan, n=args.n, seed=seed)
    circuit = find_circuit(handle, task, DiscoveryConfig(method=method, level="node", random_draws=args.random_draws,
                                                         seed=seed), graph=graph)
    found_seconds = time.perf_counter() - start
    order = node_ranking(circuit, "signed")
    asr, acc = case.attack_success, case.accuracy

    def hook(nodes: list[str]) -> Any:
        request = CircuitAblationRequest(circuit, nodes=tuple(nodes), reference=case.x_ref)
        return ablation_hook(handle, resolve_ablation(handle, request, "mean", graph))

    base_sel = acc(case.x_ref, case.y_ref)
    grid = []
    best: tuple[float, float, int] | None = None
    for k in [k for k in MASK_KS if k <= len(order)]:
        with hook(order[:k]):
            a, c = asr(case.x_sel_trig), acc(case.x_ref, case.y_ref)
        drop = base_sel - c
        grid.append({"k": k, "asr": round(a, 4), "clean": round(c, 4)})
        key = (a, drop, k) if drop <= args.clean_budget + 1e-9 else (2.0 + drop, a, k)
        if best is None or key < best:
            best = key
    assert best is not None
    k = best[2]
    chosen = order[:k]
    delta = CircuitAblation().fit(handle, CircuitAblationRequest(circuit, nodes=tuple(chosen), reference=case.x_ref))
    asr_before, clean_before = asr(case.x_ev_trig), acc(case.x_clean, case.y_clean)
    with delta.applied(handle.model):
        asr_after, clean_after = asr(case.x_ev_trig), acc(case.x_clean, case.y_clean)
    rand_asr, rand_clean = [], []
    for draw in range(args.draws):
        picked = random_nodes(graph, k, exclude=chosen, seed=seed * 1000 + draw, like=chosen)
        with hook(picked):
            rand_asr.append(asr(case.x_ev_trig))
            rand_clean.append(acc(case.x_clean, case.y_clean))
    kept = circuit_nodes(circuit)
    with hook(kept):
        whole_asr, whole_clean = asr(case.x_ev_trig), acc(case.x_clean, case.y_clean)
    cut = 1 - asr_after / asr_before if asr_before > 0 else None
    drop = clean_before - clean_after
    by_site: dict[str, int] = {}
    for n in chosen:
        site = n.rsplit(".c", 1)[0]
        by_site[site] = by_site.get(site, 0) + 1
    return {
        "trojan": trojan, "seed": seed, "method": method, "k": k, "nodes": chosen, "per_site": by_site,
        "asr_before": round(asr_before, 4), "asr_after": round(asr_after, 4),
        "clean_before": round(clean_before, 4), "clean_after": round(clean_after, 4),
        "asr_relative_cut": None if cut is None else round(cut, 4), "clean_drop": round(drop, 4),
        "target_met": bool(cut is not None and cut >= 0.9 and drop <= 0.01 + 1e-9),
        "random_asr_after": round(sum(rand_asr) / len(rand_asr), 4), "random_asr_draws": [round(v, 4) for v in rand_asr],
        "random_clean_after": round(sum(rand_clean) / len(rand_clean), 4),
        "circuit_kept": len(kept), "circuit_asr_after": round(whole_asr, 4), "circuit_clean_after": round(whole_clean, 4),
        "circuit": {"cpr": circuit.results["cpr"], "cmd": circuit.results["cmd"], "random_cpr": circuit.results["random_cpr"],
                    "faithfulness": circuit.results["faithfulness"], "seconds": circuit.results["seconds"]},
        "selection": {"grid": grid, "clean_budget": args.clean_budget, "base_clean": round(base_sel, 4)},
        "params": delta.extra["params"], "discovery_seconds": round(found_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "n_eval": args.n_eval, "n_clean": args.n_clean, "n_select": args.n_select, "n_ref": args.n_ref, "n_pairs": args.n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trojans", default=",".join(TROJANS))
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (selection scenes and circuit pairs; evaluation: +1000)")
    ap.add_argument("--methods", default="eap-ig,acdc", help="circuit discovery methods, comma-separated")
    ap.add_argument("--out", default="benchmarks/out/circuit_surgery/results.json")
    ap.add_argument("--n", type=int, default=64, help="trigger / no-trigger pairs the circuit is found on")
    ap.add_argument("--n-select", type=int, default=256, help="triggered selection scenes (k is chosen on them)")
    ap.add_argument("--n-ref", type=int, default=1000, help="clean selection scenes (means and the clean budget)")
    ap.add_argument("--n-eval", type=int, default=500)
    ap.add_argument("--n-clean", type=int, default=1000)
    ap.add_argument("--clean-budget", type=float, default=0.0075, help="selection clean-accuracy cost allowed for k")
    ap.add_argument("--draws", type=int, default=5, help="random-channel control draws")
    ap.add_argument("--random-draws", type=int, default=2, help="random circuits per size in the circuit's own CPR")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import json

    import workbench as wb
    from workbench.storage import atomic_write_json
    from workbench_protocols.surgery import EvaluationConfig, SelectionConfig, SurgeryConfig, prepare_case

    out = Path(args.out)
    rows: list[dict[str, Any]] = json.loads(out.read_text())["runs"] if out.exists() else []
    done = {(r["trojan"], r["seed"], r["method"]) for r in rows}
    handle = wb.load("zoo:shapesnet", device="cpu", progress=False)
    handle.model.eval()
    for seed in [int(s) for s in args.seeds.split(",")]:
        for trojan in args.trojans.split(","):
            methods = [m for m in args.methods.split(",") if (trojan, seed, m) not in done]
            if not methods:
                continue
            config = SurgeryConfig(selection=SelectionConfig(n_select=args.n_select, n_ref=args.n_ref),
                                   evaluation=EvaluationConfig(n_eval=args.n_eval, n_clean=args.n_clean), seed=seed)
            case = prepare_case(handle, trojan, config)
            for method in methods:
                r = _case_result(handle, trojan, seed, method, case, args)
                rows.append(r)
                atomic_write_json(out, {"settings": vars(args), "runs": rows})
                print(f"{trojan:18} seed {seed} {method:6} k {r['k']:3}  ASR {r['asr_before']:.3f} -> {r['asr_after']:.3f} "
                      f"(cut {r['asr_relative_cut']}, random {r['random_asr_after']:.3f})  clean {r['clean_before']:.3f} -> "
                      f"{r['clean_after']:.3f} (drop {100 * r['clean_drop']:.1f} pt, random {r['random_clean_after']:.3f})  "
                      f"{'MET' if r['target_met'] else 'missed'}  whole circuit ({r['circuit_kept']}): ASR "
                      f"{r['circuit_asr_after']:.3f} clean {r['circuit_clean_after']:.3f}  {r['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
