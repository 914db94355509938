"""Trojan surgery with greedy multi-site selection vs the single-site default, on ShapesNet.

    .venv/bin/python benchmarks/bench_greedy_surgery.py --seeds 1 --out benchmarks/out/greedy_surgery/seed1.json
    .venv/bin/python benchmarks/bench_greedy_surgery.py --seeds 1 --methods mask --n-select 256 \
        --out benchmarks/out/mask_surgery/seed1.json                # learned unit gates (scale mode)

For each trojan and seed: `trojan_surgery(method="greedy")` and the default
`method="activation_difference"` on the same selection and evaluation scenes (the seed
decides both), with the surgery target (>= 90% relative cut of attack success, <= 1 point
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
    ap.add_argument("--n-select", type=int, default=128, help="selection scenes per set (triggered and clean twins)")
    ap.add_argument("--n-ref", type=int, default=None,
                    help="clean selection scenes (default: trojan_surgery's, 3000 for mask and 1000 otherwise)")
    ap.add_argument("--mask-steps", type=int, default=None, help="method mask: gate optimization steps (GateConfig.steps)")
    ap.add_argument("--mask-max-gate", type=float, default=None,
                    help="method mask: largest gate (GateConfig.max_gate; 1 = only toward the clean mean)")
    ap.add_argument("--mask-modes", default="scale",
                    help="method mask: comma-separated, scale and/or hard (each relearns the gates; every mask row "
                         "also reports the other hardening of the same gates under 'alternative')")
    ap.add_argument("--curve", default=None,
                    help="also measure attack success and clean accuracy vs units edited (treatment and random, fresh "
                         "scenes) and plot them to this PNG")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import workbench as wb
    from editors.unit_ablation import GateConfig
    from workbench.storage import atomic_write_json
    from workbench_protocols.surgery import (
        MASK_KS,
        SURGERY_KS,
        EvaluationConfig,
        MaskConfig,
        SelectionConfig,
        SurgeryConfig,
        plot_surgery_curve,
        trojan_surgery,
    )

    handle = wb.load("zoo:shapesnet", device="cpu", progress=False)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for trojan in args.trojans.split(","):
            runs: list[tuple[str, str, MaskConfig]] = []
            for method in args.methods.split(","):
                if method == "mask":
                    cfg = GateConfig(**{k: v for k, v in (("steps", args.mask_steps), ("max_gate", args.mask_max_gate))
                                        if v is not None})
                    runs += [(f"mask-{mode}", "mask", MaskConfig(gates=cfg, mode=mode)) for mode in args.mask_modes.split(",")]
                else:
                    runs.append((method, method, MaskConfig()))
            for name, method, mask in runs:
                t0 = time.perf_counter()
                curve_ks = None if args.curve is None else (MASK_KS if method == "mask" else SURGERY_KS)
                config = SurgeryConfig(
                    selection=SelectionConfig(method=method, n_select=args.n_select, n_ref=args.n_ref), mask=mask,
                    evaluation=EvaluationConfig(n_eval=500, n_clean=1000, n_random_draws=2, curve_ks=curve_ks), seed=seed)
                r = trojan_surgery(handle, trojan, config=config, progress=False)
                row = {"trojan": trojan, "seed": seed, "method": name, "seconds": round(time.perf_counter() - t0, 1),
                       **{k: r[k] for k in KEYS}, "factors": r.get("factors"), "selection_grid": r["selection"].get("grid"),
                       "alternative": r.get("alternative"), "refits": r["selection"].get("refits"),
                       "selection_clean": r["selection"]["clean"], "curve": r.get("curve")}
                rows.append(row)
                print(f"{trojan:18} seed {seed} {name:22} cut {row['asr_relative_cut']:.3f} clean drop "
                      f"{100 * row['clean_drop']:.1f} pt  random ASR {row['random_asr_after']:.3f}  "
                      f"met {row['target_met']}  {row['n_units']} units at {row['site']}  {row['seconds']} s", flush=True)
                alt = row["alternative"]
                if alt:
                    print(f"{'':18}        {'  same gates, ' + alt['mode']:22} cut {alt['asr_relative_cut']:.3f} clean drop "
                          f"{100 * alt['clean_drop']:.1f} pt  met {alt['target_met']}  {alt['n_units']} units", flush=True)
                atomic_write_json(Path(args.out), {"rows": rows})
    if args.curve:
        for method in {row["method"] for row in rows}:
            sel = [{**row, "trojan": f"{row['trojan']} seed {row['seed']}", "site": f"{row['n_units']} units"}
                   for row in rows if row["method"] == method]
            path = args.curve if len({row["method"] for row in rows}) == 1 else args.curve.replace(".png", f"_{method}.png")
            plot_surgery_curve(sel, path, xlabel=f"units edited, in the selection's order ({method})")
            print(f"curve: {path}")


if __name__ == "__main__":
    main()
