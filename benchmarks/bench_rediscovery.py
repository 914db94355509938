"""Trojan rediscovery on ShapesNet, scored by an automatic 8-way multiple choice (Casper et al. 2023).

Each feature-synthesis method (feature visualization of the target logit, scene or Fourier
parameterization; copy/paste search; feature-level adversary; natural search (SNAFUE);
adversarial filtering; adversarial patch) is given each implanted trojan's target class
(and the source class of class-universal ones) and synthesizes images; the judge (palette
colour content + an attribute network trained on clean ShapesWorld pictures, no trojans)
answers the 8-way question: the true trigger among the 7 most similar same-kind designs.
Score = share of views voting for the true trigger; chance 0.125; published human best 0.47
(all methods together 0.49; CLIP as judge 0.06-0.21).

    .venv/bin/python benchmarks/bench_rediscovery.py [--quick] [--held-out [--no-zoo]] [--seeds 0,1] [--methods natural] [--json]

`--held-out` also trains (and caches) a ShapesNet on benchmarks/held_out_trojans.json (three
trojans, one per kind, with triggers and targets the zoo's model does not use; one model per
seed) and rediscovers those. `--seeds` runs every seed and prints the mean over seeds per
method and per trojan kind (one seed gives 0-or-1 answers per trojan for a one-view method:
read single-seed numbers as coarse).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="'tiny' budget per method instead of 'quick'")
    ap.add_argument("--full", action="store_true", help="'full' budget per method")
    ap.add_argument("--held-out", action="store_true", help="also run the held-out trojan config")
    ap.add_argument("--no-zoo", action="store_true", help="skip the zoo model (with --held-out: the held-out config only)")
    ap.add_argument("--methods", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (overrides --seed); means over seeds are printed")
    ap.add_argument("--out", default=None, help="folder for views and JSON (default: none)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.no_zoo and not args.held_out:
        ap.error("--no-zoo leaves nothing to run without --held-out")
    torch.set_num_threads(1)
    import workbench
    from workbench.worlds.trojans import load_trojans
    from workbench_protocols import rediscovery as rd

    budget = "tiny" if args.quick else ("full" if args.full else "quick")
    methods = args.methods.split(",") if args.methods else None
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    h = workbench.load("zoo:shapesnet", device="cpu", progress=False)
    base = Path(args.out) if args.out else None
    report: dict = {"budget": budget, "seeds": seeds, "runs": {}}
    results: dict[str, list] = {"zoo": [], "held_out": []}
    for seed in seeds:
        out = (base / f"seed{seed}") if base and len(seeds) > 1 else base
        run: dict = {}
        if not args.no_zoo:
            res = rd.rediscover(h, methods=methods, budget=budget, seed=seed, progress=not args.json,
                                views_dir=(out / "zoo" / "views") if out else None)
            run["zoo"] = res.to_json()
            results["zoo"].append(res)
            if out:
                res.save(out / "zoo")
        if args.held_out:
            config = load_trojans(Path(__file__).with_name("held_out_trojans.json"))
            hh = rd.model_for_trojans(config, seed=seed, quick=True, progress=not args.json)
            run["held_out_model"] = {k: hh.info.get(k) for k in ("accuracy", "trojans")}
            held = rd.rediscover(hh, trojans=config, methods=methods, budget=budget, seed=seed, progress=not args.json,
                                 views_dir=(out / "held_out" / "views") if out else None)
            run["held_out"] = held.to_json()
            results["held_out"].append(held)
            if out:
                held.save(out / "held_out")
        report["runs"][str(seed)] = run
        if not args.json:
            if not args.no_zoo:
                print(f"# trojan rediscovery, ShapesNet zoo model, budget {budget}, seed {seed}")
                print(results["zoo"][-1].table())
            if args.held_out:
                print(f"\n# held-out config, seed {seed}, model: {run['held_out_model']}")
                print(results["held_out"][-1].table())
            print()
    report["summary"] = {name: summarize(rs) for name, rs in results.items() if rs}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name, sm in report["summary"].items():
        print(f"## {name}: mean over seeds {seeds} ({sm['n_questions_per_method']} questions per method)")
        for m, v in sm["per_method"].items():
            kinds = ", ".join(f"{k} {x:.2f}" for k, x in sm["per_method_kind"][m].items())
            per_seed = " / ".join(f"{x:.2f}" for x in sm["per_method_seed"][m])
            vk = ", ".join(f"{k} {x:.2f}" for k, x in sm["per_method_vote_kind"][m].items())
            print(f"  {m:<24} share of votes {v:.3f}  (seeds {per_seed}; {kinds}); "
                  f"one answer per method (weighted consensus) {sm['per_method_vote'][m]:.3f} ({vk})")
        print(f"  all methods pooled: {sm['combined']:.3f}; per kind (all methods): "
              + ", ".join(f"{k} {v:.2f}" for k, v in sm["per_kind"].items()))
        top = max(sm["per_method"], key=sm["per_method"].get)
        print(f"  best method: {top} {sm['per_method'][top]:.3f}; target mean >= 0.6: "
              f"{'MET' if sm['per_method'][top] >= 0.6 else 'MISSED'}")


def summarize(results: list) -> dict:
    """Means over seeds: per method, per method and kind, per kind, all methods pooled."""
    per: dict[str, list[float]] = {}
    vote: dict[str, list[float]] = {}
    vote_kind: dict[str, dict[str, list[float]]] = {}
    per_kind: dict[str, dict[str, list[float]]] = {}
    kinds: dict[str, list[float]] = {}
    for res in results:
        for r in res.rows:
            per.setdefault(r["method"], []).append(r["score"])
            vote.setdefault(r["method"], []).append(float(bool(r["consensus_correct"])))
            vote_kind.setdefault(r["method"], {}).setdefault(r["kind"], []).append(float(bool(r["consensus_correct"])))
            per_kind.setdefault(r["method"], {}).setdefault(r["kind"], []).append(r["score"])
            kinds.setdefault(r["kind"], []).append(r["score"])
    comb = [v for res in results for v in res.combined.get("per_trojan", {}).values()]
    return {
        "per_method": {m: round(sum(v) / len(v), 4) for m, v in per.items()},
        "per_method_seed": {m: [res.by("method").get(m, float("nan")) for res in results] for m in per},
        "per_method_kind": {m: {k: round(sum(v) / len(v), 4) for k, v in d.items()} for m, d in per_kind.items()},
        "per_kind": {k: round(sum(v) / len(v), 4) for k, v in kinds.items()},
        "per_method_vote": {m: round(sum(v) / len(v), 4) for m, v in vote.items()},
        "per_method_vote_kind": {m: {k: round(sum(v) / len(v), 4) for k, v in d.items()} for m, d in vote_kind.items()},
        "combined": round(sum(comb) / len(comb), 4) if comb else float("nan"),
        "n_questions_per_method": max((len(v) for v in per.values()), default=0),
    }


if __name__ == "__main__":
    main()
