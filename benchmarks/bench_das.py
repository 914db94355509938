"""Causal variables, MIB-style: interchange-intervention accuracy of DAS beside probe, LEACE,
difference-in-means, SAE-latent, random and whole-vector subspaces.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_das.py --out benchmarks/out/das/results.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_das.py --seed 1 --out benchmarks/out/das/results-seed1.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_das.py --cases factgpt --dims 8 --no-sae   # quicker

Cases: zoo FactGPT's subject at the subject's last token after layers 0 and 1 (where causal
tracing's hidden-state effect peaks), its relation at the last token after layers 0 and 1 and,
as a negative control, at the subject's last token; zoo ShapesNet's shape and colour on the
spatial mean of layer2 and layer3. Each case runs with every subspace size in `--dims`, on one
seed's pairs (1000 by default, 30% held out by base), one CPU thread. SAE latents come from
TopK dictionaries trained on the same sites (cached by model fingerprint; the first run trains
them). One JSON holds every case; one PNG per case goes beside it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

# (model, variable, site, position)
CASES: dict[str, list[tuple[str, str, str, str | None]]] = {
    "factgpt": [
        ("zoo:factgpt", "subject", "blocks.0.hook_resid_post", "subject"),
        ("zoo:factgpt", "subject", "blocks.1.hook_resid_post", "subject"),
        ("zoo:factgpt", "relation", "blocks.0.hook_resid_post", "last"),
        ("zoo:factgpt", "relation", "blocks.1.hook_resid_post", "last"),
        ("zoo:factgpt", "relation", "blocks.0.hook_resid_post", "subject"),
    ],
    "shapesnet": [
        ("zoo:shapesnet", "shape", "layer2", None),
        ("zoo:shapesnet", "shape", "layer3", None),
        ("zoo:shapesnet", "colour", "layer2", None),
        ("zoo:shapesnet", "colour", "layer3", None),
    ],
}
# The dictionaries the SAE baseline reads: TopK, 8x the site's width (SAE training defaults elsewhere in
# the benchmarks), FactGPT's on a quarter of the default activations to keep the first run short.
SAE_CONFIGS: dict[tuple[str, str], dict[str, Any]] = {
    ("zoo:shapesnet", "layer2"): {"kind": "topk", "width": 256, "k": 8},
    ("zoo:shapesnet", "layer3"): {"kind": "topk", "width": 512, "k": 16},
    ("zoo:factgpt", "blocks.0.hook_resid_post"): {"kind": "topk", "width": 1024, "k": 16, "n_activations": 262_144},
    ("zoo:factgpt", "blocks.1.hook_resid_post"): {"kind": "topk", "width": 1024, "k": 16, "n_activations": 262_144},
}


def _dictionary(handle: Any, spec: str, site: str, cache: dict[tuple[str, str], Any]) -> tuple[Any, dict[str, Any]]:
    from workbench.dictionaries import TrainConfig, train_dictionary

    key = (spec, site)
    if key not in cache:
        settings = SAE_CONFIGS[key]
        t0 = time.perf_counter()
        trained = train_dictionary(handle, site, TrainConfig(threads=1, **settings), progress=False)
        quality = trained.dictionary.config.metadata.get("quality", {})
        cache[key] = (trained.dictionary, {**settings, "explained_variance": quality.get("explained_variance"),
                                           "seconds": round(time.perf_counter() - t0, 1)})
    return cache[key]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from workbench.causal_variables import DASConfig, align, plot_iia, world_pairs
    from workbench.models import load

    torch.set_num_threads(1)
    out = Path(args.out)
    handles: dict[str, Any] = {}
    saes: dict[tuple[str, str], Any] = {}
    rows: list[dict[str, Any]] = []
    for group in args.cases.split(","):
        for spec, variable, site, position in CASES[group]:
            handle = handles.setdefault(spec, load(spec, device="cpu", progress=False))
            t0 = time.perf_counter()
            pairs = world_pairs(handle, variable, n=args.n, seed=args.seed, position=position)
            pair_seconds = time.perf_counter() - t0
            dictionary, sae_info = (None, None)
            if args.sae:  # trained on every position of the site, so it serves the last token too
                dictionary, sae_info = _dictionary(handle, spec, site, saes)
            for dim in [int(d) for d in args.dims.split(",")]:
                config = DASConfig(dim=dim, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
                result = align(handle, pairs, site, config, dictionary=dictionary, progress=False)
                doc = {"model": spec, "position": pairs.meta["position"], "pair_seconds": round(pair_seconds, 2),
                       "sae": sae_info, **result.to_json()}
                rows.append(doc)
                name = f"{spec.removeprefix('zoo:')}-{variable}-{site}-{doc['position']}-k{dim}-seed{args.seed}.png"
                plot_iia(result, out.parent / name)
                cells = "  ".join(f"{m['method']} {m['iia']:.3f}" + (f"/k{m['k']}" if m["k"] != dim else "")
                                  for m in doc["methods"])
                print(f"{spec:13} {variable:8} {site:25} {doc['position']:7} k={dim:<3} {cells}", flush=True)
    return {"seed": args.seed, "n_pairs": args.n, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
            "threads": 1, "torch": torch.__version__, "cases": rows}


def main() -> None:
    from workbench.storage import atomic_write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/out/das/results.json")
    parser.add_argument("--cases", default="factgpt,shapesnet", help="comma-separated: factgpt, shapesnet")
    parser.add_argument("--dims", default="4,16", help="subspace sizes k, comma-separated")
    parser.add_argument("--n", type=int, default=1000, help="interchange pairs per case")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-sae", dest="sae", action="store_false", help="skip the SAE baseline (and its training)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    doc = run(args)
    doc["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(args.out, doc)
    print(f"wrote {args.out} ({doc['seconds']} s)")


if __name__ == "__main__":
    main()
