"""How much MEMIT's least squares must write onto subjects it does not edit, from the keys alone.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memit_key_geometry.py --model zoo:factgpt-large

MEMIT maps a key k to dW k = R a(k), with a(k) = K^T (lam C + K K^T)^-1 k for the edited keys
K (one row per rewrite) and the residuals R. Ideally a(k_i) = e_i for an edited key and 0
for any other. With 1,000 distinct subjects (their layer-0 keys at the subject's last
token, averaged over the shipped 4 world prefixes), the first N are edited and the last 500
are left alone. Reported: `self`, the mean a_ii (the share of its own residual an edited
key receives) and `leak`, the mean ||a(k_u)|| over untouched keys (how much of a residual
lands on a subject nobody edited). Also the participation ratio of the C^-1/2-whitened keys
(their effective dimension in the metric the least squares uses). No values are optimized,
so this takes a minute and predicts, before any edit, where the ES-NS front lies.

`--joint-layers 0,1,2` screens one least squares over several layers' keys instead (a variant
of MEMIT's layer walk that the library does not ship, since its edits landed no better; see
RESULTS.md): each layer's keys divided by the root mean diagonal of its second moment and put
side by side, with the block-diagonal second moment.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from editors.memit import key_write_shares  # noqa: E402
from editors.mlp_update import context_templates, key_statistics, subject_keys  # noqa: E402
from workbench.requests import Rewrite  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="zoo:factgpt-large",
                    help="a FactGPT zoo model with >= 1000 subjects, or a folder from train_factgpt_variant.py")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--joint-layers", default=None, help="comma list of layers whose keys are solved together "
                    "(one least squares over all of them); overrides --layer")
    ap.add_argument("--edits", default="125,250,500", help="comma list of edit-batch sizes N (each <= 500)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.edits.split(",") if x.strip()]
    if not sizes or max(sizes) > 500 or min(sizes) < 1:
        ap.error(f"--edits {args.edits!r}: give sizes between 1 and 500 (the last 500 subjects stay untouched)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_editing import _load_model

    handle = _load_model(args.model)
    world = handle.info.get("world")
    if world is None or len(world.subjects) < 1000:
        ap.error(f"{args.model} needs a FactWorld with at least 1000 subjects (zoo:factgpt-large or a variant)")
    records = world.counterfact_records(1000, seed=0, distinct_subjects=True)
    rewrites = [Rewrite.from_counterfact(r) for r in records]
    templates = context_templates(handle, n_prefixes=4, length=8, seed=0, source="world")
    try:
        layers = [int(x) for x in args.joint_layers.split(",")] if args.joint_layers else [args.layer]
    except ValueError:
        ap.error(f"--joint-layers {args.joint_layers!r}: give a comma list of layer numbers, e.g. 0,1")
    n_layers = handle.model.config.n_layer
    if not layers or min(layers) < 0 or max(layers) >= n_layers or len(set(layers)) != len(layers):
        ap.error(f"layers {layers}: give distinct layers between 0 and {n_layers - 1}")
    parts, blocks = [], []
    for layer in layers:
        cl = key_statistics(handle, layer, corpus="world", n_samples=100_000).second_moment.double()
        scale = float(cl.diagonal().mean().sqrt()) if len(layers) > 1 else 1.0  # no layer dominates by its activations' scale
        parts.append(subject_keys(handle, layer, rewrites, templates).double() / scale)
        blocks.append(cl / scale ** 2)
    keys, c = torch.cat(parts, dim=1), torch.block_diag(*blocks)
    d = c.shape[0]
    evals, evecs = torch.linalg.eigh(c)
    whitened = keys @ evecs @ torch.diag(evals.clamp_min(1e-10 * float(evals.max())).rsqrt()) @ evecs.T
    gram = torch.linalg.eigvalsh(whitened.T @ whitened)
    out = {"model": args.model, "layers": layers, "d_in": d, "d_model": handle.model.config.n_embd,
           "whitened_participation_ratio": round(float(gram.sum() ** 2 / (gram ** 2).sum()), 1), "rows": []}
    untouched = keys[500:]
    print(f"{args.model}: d_model {out['d_model']}, key width {d}, whitened participation ratio "
          f"{out['whitened_participation_ratio']}")
    print(f"{'edits':>6} {'lambda':>8} {'self':>6} {'leak':>6}")
    for n in sizes:
        for lam in (d / 4, d, 4 * d):
            shares = key_write_shares(keys[:n], untouched, c, lam)
            row = {"edits": n, "lambda": lam, "self": round(shares["self"], 3), "leak": round(shares["leak"], 3)}
            out["rows"].append(row)
            print(f"{n:>6} {lam:>8g} {row['self']:>6.3f} {row['leak']:>6.3f}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
