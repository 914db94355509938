"""Neuron and representation editors, measured: trojan surgery, LEACE, steering, rule rewrite.

    .venv/bin/python benchmarks/bench_unit_editors.py [--quick] [--only surgery,erase,steer,rewrite] [--out DIR]

- surgery: for every ShapesNet trojan, `trojan_surgery` (units selected on their own data,
  mean-ablated by a BatchNorm edit) vs the same number of random units at the same site
  (5 draws); attack success and clean accuracy on fresh scenes; the curve of attack
  success vs units removed, treatment vs random, as a PNG.
- erase: LEACE (and orth) for sentiment of template sentences at MiniLM
  `blocks.3.mlp.hook_out`, folded into `output.dense`; linear probes (held-out sentences)
  for sentiment and for topic (independent of sentiment), at the erased site, and at the
  residual stream after the block (which the fold does not reach: see the text).
- steer: MiniLM, sentiment direction at `blocks.L.mlp.hook_out` added to its bias; the
  projection of neutral sentences' embeddings on the sentiment axis vs strength.
- rewrite: ShapesNet, colour-disagree and clean accuracy before/after the rank-r rewrite.

Numbers are printed as tables and written to DIR/unit_editors.json (default
benchmarks/out/unit_editors); CPU timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workbench.storage import atomic_write_json  # noqa: E402


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    line = " | ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "-|-".join("-" * w for w in widths)]
    out += [" | ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return ",".join(str(x) for x in v[:8]) + ("..." if len(v) > 8 else "")
    return str(v)


def surgery(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import workbench as wb
    from workbench_protocols.surgery import (
        EvaluationConfig,
        SelectionConfig,
        SurgeryConfig,
        plot_surgery_curve,
        trojan_surgery,
    )

    h = wb.load("zoo:shapesnet", device="cpu", progress=False)
    names = [t["name"] for t in h.info["world"]["trojans"]]
    results = []
    for method in args.methods.split(","):
        for name in names:
            t0 = time.perf_counter()
            config = SurgeryConfig(
                selection=SelectionConfig(method=method, n_select=96 if args.quick else 256),
                evaluation=EvaluationConfig(n_eval=200 if args.quick else 500, n_clean=400 if args.quick else 1000,
                                            n_random_draws=5, curve_ks=(1, 2, 4, 8, 16)),
                seed=args.seed)
            r = trojan_surgery(h, name, config=config, progress=False)
            r["seconds"] = round(time.perf_counter() - t0, 1)
            results.append(r)
            print(f"  {method} {name}: asr {r['asr_before']:.3f}->{r['asr_after']:.3f} (random {r['random_asr_after']:.3f}), "
                  f"clean {r['clean_before']:.3f}->{r['clean_after']:.3f} at {r['site']} k={r['n_units']} "
                  f"[{'met' if r['target_met'] else 'missed'}] {r['seconds']} s", flush=True)
        plot_surgery_curve([r for r in results if r["method"] == method], out / f"surgery_curve_{method}.png")
    cols = ["method", "trojan", "site", "n_units", "asr_before", "asr_after", "random_asr_after", "clean_before",
            "clean_after", "random_clean_after", "asr_relative_cut", "clean_drop", "target_met"]
    print("\nTrojan surgery (mean ablation folded into BatchNorm; random = same site, same count, mean of 5 draws)")
    print(_table(results, cols))
    return {"surgery": results}


def _minilm() -> Any:
    import workbench as wb

    return wb.load("minilm", device="cpu", progress=False)


def erase(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from editors.concept_erasure import ConceptData, ConceptErasure, example_sentences, probe_accuracy, representations

    h = _minilm()
    n = 600 if args.quick else 1200
    texts, sentiment, topic = example_sentences(n, seed=args.seed)
    n_train = int(0.6 * n)
    s, t = torch.tensor(sentiment), torch.tensor(topic)
    rows = []
    for site in ("blocks.3.mlp.hook_out",) if args.quick else ("blocks.1.mlp.hook_out", "blocks.3.mlp.hook_out", "blocks.3.attn.hook_out"):
        resid = f"blocks.{site.split('.')[1]}.hook_resid_post"
        for method in ("leace", "orth"):
            t0 = time.perf_counter()
            delta = ConceptErasure(site, method=method).fit(h, ConceptData.of(texts[:n_train], sentiment[:n_train]))
            fit_s = time.perf_counter() - t0

            def probes(where: str) -> tuple[float, float]:
                x, _ = representations(h, where, texts)
                return (probe_accuracy(x[:n_train], s[:n_train], x[n_train:], s[n_train:]),
                        probe_accuracy(x[:n_train], t[:n_train], x[n_train:], t[n_train:]))

            sb, tb = probes(site)
            rb, _ = probes(resid)
            with delta.applied(h.model):
                sa, ta = probes(site)
                ra, _ = probes(resid)
            rows.append({"site": site, "method": method, "sentiment_before": sb, "sentiment_after": sa, "topic_before": tb,
                         "topic_after": ta, "resid_sentiment_before": rb, "resid_sentiment_after": ra,
                         "chance": float(torch.bincount(s[n_train:]).max()) / (n - n_train), "fit_seconds": round(fit_s, 1),
                         "rank": delta.extra["rank"]})
            print(f"  {site} {method}: sentiment {sb:.3f}->{sa:.3f}, topic {tb:.3f}->{ta:.3f}, "
                  f"residual after block: {rb:.3f}->{ra:.3f}", flush=True)
    print(f"\nLEACE on MiniLM ({n} template sentences, {n_train} to fit eraser and probes, {n - n_train} held out)")
    print(_table(rows, ["site", "method", "sentiment_before", "sentiment_after", "chance", "topic_before", "topic_after",
                        "resid_sentiment_before", "resid_sentiment_after", "fit_seconds"]))
    return {"erase": rows, "erase_n": n, "erase_n_train": n_train}


def steer(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from editors.concept_erasure import example_sentences
    from editors.steering import ContrastPairs, concept_axis_measure, dose_response, steering_direction

    h = _minilm()
    texts, sentiment, _ = example_sentences(400, seed=args.seed + 1)
    ref_t, ref_s, _ = example_sentences(200, seed=args.seed + 2)
    pairs = ContrastPairs.of([x for x, y in zip(texts, sentiment) if y], [x for x, y in zip(texts, sentiment) if not y])
    measure = concept_axis_measure(h, ref_t, ref_s)
    rows = []
    strengths = [-2, -1, -0.5, 0, 0.5, 1, 2] if args.quick else [-4, -2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 4]
    for layer in (1, 3) if args.quick else (0, 1, 2, 3, 4, 5):
        for position in ("mean", "last"):
            site = f"blocks.{layer}.mlp.hook_out"
            d = steering_direction(h, site, pairs, position=position)
            r = dose_response(h, site, d, strengths, measure)
            if layer == 3 and position == "mean":
                r.plot(out / "steering_dose_response.png", ylabel="projection on sentiment axis")
            rows.append({"site": site, "position": position, "spearman": r.spearman, "monotonic": r.monotonic,
                         "at_min": r.values[0], "at_0": r.values[strengths.index(0)], "at_max": r.values[-1],
                         "direction_norm": r.details["direction_norm"]})
    print("\nSteering on MiniLM: projection of 8 neutral sentences on the sentiment axis vs strength "
          f"({strengths[0]}..{strengths[-1]})")
    print(_table(rows, ["site", "position", "spearman", "monotonic", "at_min", "at_0", "at_max", "direction_norm"]))
    return {"steer": rows, "steer_strengths": strengths}


def rewrite(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import workbench as wb
    from editors.rule_rewrite import RuleRewrite, colour_pairs
    from workbench.zoo.shapesnet import world_of

    h = wb.load("zoo:shapesnet", device="cpu", progress=False)
    world = world_of(h)
    n_eval = 600 if args.quick else 2000
    sets = {}
    for name, seed, mode in (("clean", 11, "natural"), ("disagree", 12, "disagree")):
        sample = world.sample(n_eval, generator=torch.Generator().manual_seed(args.seed + seed), color_mode=mode)
        sets[name] = (world.render(sample), sample.labels)

    def acc() -> dict[str, float]:
        with torch.no_grad():
            return {k: float((torch.cat([h.model(x[i:i + 250]).argmax(-1) for i in range(0, len(y), 250)]) == y).float().mean())
                    for k, (x, y) in sets.items()}

    base = acc()
    configs = [("layer3.conv2", 32, "keys", 800), ("layer3.conv2", 16, "keys", 800), ("layer3.conv2", 1, "keys", 800),
               ("fc", 1, "difference", 300), ("fc", 2, "difference", 300), ("layer3.conv1", 8, "keys", 300)]
    if args.quick:
        configs = configs[:1] + configs[4:5]
    rows = []
    for layer, rank, dirs, n in configs:
        t0 = time.perf_counter()
        delta = RuleRewrite(layer=layer, rank=rank, directions=dirs).fit(h, colour_pairs(world, n, seed=args.seed, mask=None))
        fit_s = time.perf_counter() - t0
        with delta.applied(h.model):
            after = acc()
        rows.append({"layer": layer, "rank": rank, "directions": dirs, "pairs": n, "disagree_before": base["disagree"],
                     "disagree_after": after["disagree"], "gain_points": 100 * (after["disagree"] - base["disagree"]),
                     "clean_before": base["clean"], "clean_after": after["clean"],
                     "clean_drop_points": 100 * (base["clean"] - after["clean"]),
                     "relative_update": delta.extra["relative_update"], "fit_seconds": round(fit_s, 1)})
        print(f"  {layer} rank {rank}: disagree {base['disagree']:.3f}->{after['disagree']:.3f}, "
              f"clean {base['clean']:.3f}->{after['clean']:.3f}", flush=True)
    print(f"\nRule rewrite on ShapesNet (red -> natural colour pairs; {n_eval} fresh scenes per accuracy)")
    print(_table(rows, ["layer", "rank", "directions", "pairs", "disagree_before", "disagree_after", "gain_points",
                        "clean_before", "clean_after", "clean_drop_points", "relative_update", "fit_seconds"]))
    return {"rewrite": rows, "rewrite_n_eval": n_eval}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sets and sweeps")
    parser.add_argument("--only", default="surgery,erase,steer,rewrite")
    parser.add_argument("--methods", default="activation_difference", help="surgery selection methods, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "unit_editors"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = {"surgery": surgery, "erase": erase, "steer": steer, "rewrite": rewrite}
    result: dict[str, Any] = {"quick": args.quick, "seed": args.seed}
    path = out / "unit_editors.json"
    if path.exists():
        try:
            result = {**json.loads(path.read_text()), "quick": args.quick, "seed": args.seed}
        except ValueError:
            pass
    for name in args.only.split(","):
        if name not in parts:
            raise SystemExit(f"unknown part {name!r}; choose from {', '.join(parts)}")
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        result.update(parts[name](args, out))
        result[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(path, result)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
