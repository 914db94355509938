"""Trojan rediscovery on ShapesNet, scored by an automatic 8-way multiple choice (Casper et al. 2023).

Each feature-synthesis method (feature visualization of the target logit, scene or Fourier
parameterization; copy/paste search; feature-level adversary; natural search (SNAFUE);
adversarial filtering; adversarial patch) is given each implanted trojan's target class
(and the source class of class-universal ones) and synthesizes images; the judge (palette
colour content + an attribute network trained on clean ShapesWorld pictures, no trojans)
answers the 8-way question: the true trigger among the 7 most similar same-kind designs.
Score = share of views voting for the true trigger; chance 0.125; published human best 0.47
(all methods together 0.49; CLIP as judge 0.06-0.21).

    .venv/bin/python benchmarks/bench_rediscovery.py [--quick] [--held-out] [--json]

`--held-out` also trains (and caches) a ShapesNet on benchmarks/held_out_trojans.json (three
trojans, one per kind, with triggers and targets the zoo's model does not use) and
rediscovers those.
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
    ap.add_argument("--methods", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for views and JSON (default: none)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import workbench
    from workbench import rediscovery as rd
    from workbench.worlds.trojans import load_trojans

    budget = "tiny" if args.quick else ("full" if args.full else "quick")
    methods = args.methods.split(",") if args.methods else None
    h = workbench.load("zoo:shapesnet", device="cpu", progress=False)
    out = Path(args.out) if args.out else None
    res = rd.rediscover(h, methods=methods, budget=budget, seed=args.seed, progress=not args.json,
                        views_dir=(out / "zoo" / "views") if out else None)
    report = {"zoo": res.to_json()}
    if out:
        res.save(out / "zoo")
    held = None
    if args.held_out:
        config = load_trojans(Path(__file__).with_name("held_out_trojans.json"))
        hh = rd.model_for_trojans(config, seed=args.seed, quick=True, progress=not args.json)
        report["held_out_model"] = {k: hh.info.get(k) for k in ("accuracy", "trojans")}
        held = rd.rediscover(hh, trojans=config, methods=methods, budget=budget, seed=args.seed, progress=not args.json,
                             views_dir=(out / "held_out" / "views") if out else None)
        report["held_out"] = held.to_json()
        if out:
            held.save(out / "held_out")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"# trojan rediscovery, ShapesNet zoo model, budget {budget}, seed {args.seed}")
    print(res.table())
    best = res.by("method")
    top = max(best, key=best.get)
    print(f"best single method: {top} {best[top]:.3f}; all methods pooled: {res.combined.get('mean')}; "
          f"target mean >= 0.6: {'MET' if best[top] >= 0.6 else 'MISSED'} (best method)")
    if held is not None:
        print(f"\n# held-out config ({len(held.rows) and len({r['name'] for r in held.rows})} trojans), model: "
              f"{report['held_out_model']}")
        print(held.table())


if __name__ == "__main__":
    main()
