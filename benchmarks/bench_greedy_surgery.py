"""Trojan surgery with greedy multi-site selection vs the single-site default, on ShapesNet.

    .venv/bin/python benchmarks/bench_greedy_surgery.py --seeds 1 --out benchmarks/out/greedy_surgery/seed1.json

For each trojan and seed: `trojan_surgery(method="greedy")` and the default
`method="activation_difference"` on the same selection and evaluation scenes (the seed
decides both), with issue 5's target (>= 90% relative cut of attack success, <= 1 point
clean drop, on fresh scenes) and the random-unit control. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

TROJANS = ("patch-universal", "patch-square", "style-universal", "style-star", "natural-universal", "natural-circle")
KEYS = ("site", "n_units", "asr_before", "asr_after", "asr_relative_cut", "clean_drop", "random_asr_after", "target_met")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trojans", default=",".join(TROJANS))
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--methods", default="greedy,activation_difference")
    ap.add_argument("--out", default="benchmarks/out/greedy_surgery/results.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import workbench as wb
    from editors.unit_ablation import trojan_surgery
    from workbench.storage import atomic_write_json

    handle = wb.load("zoo:shapesnet", device="cpu", progress=False)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for trojan in args.trojans.split(","):
            for method in args.methods.split(","):
                t0 = time.perf_counter()
                r = trojan_surgery(handle, trojan, method=method, seed=seed, n_select=128, n_ref=1000, n_eval=500,
                                   n_clean=1000, n_random_draws=2, progress=False)
                row = {"trojan": trojan, "seed": seed, "method": method, "seconds": round(time.perf_counter() - t0, 1),
                       **{k: r[k] for k in KEYS}}
                rows.append(row)
                print(f"{trojan:18} seed {seed} {method:22} cut {row['asr_relative_cut']:.3f} clean drop "
                      f"{100 * row['clean_drop']:.1f} pt  random ASR {row['random_asr_after']:.3f}  "
                      f"met {row['target_met']}  {row['n_units']} units at {row['site']}  {row['seconds']} s", flush=True)
                atomic_write_json(Path(args.out), {"rows": rows})


if __name__ == "__main__":
    main()
