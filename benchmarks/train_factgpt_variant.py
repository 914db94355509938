"""Train a FactGPT-large variant outside the zoo, to test what limits mass editing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_factgpt_variant.py --d-model 256 --out runs/factgpt-dm256

Same world, recipe and seed as `zoo:factgpt-large`; only the sizes, or the world's pool of
shared last words, given change. The folder loads with `workbench.zoo.factgpt.load` and is
accepted by `bench_editing.py --model DIR` and `memit_key_geometry.py --model DIR`. Training
stops once every fact is known: about an hour of one CPU core at d_model 256 (3,200 steps) or
d_mlp 2048 (3,050 steps), 16 minutes with `--shared-last-words 0` (1,100 steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.storage import fill_new_folder  # noqa: E402
from workbench.zoo import factgpt, factgpt_large  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="new folder for the trained model (must not exist)")
    ap.add_argument("--d-model", type=int, default=factgpt_large.CONFIG.d_model)
    ap.add_argument("--d-mlp", type=int, default=factgpt_large.CONFIG.d_mlp)
    ap.add_argument("--shared-last-words", type=int, default=factgpt_large.CONFIG.world.shared_last_words,
                    help="pool of last words the subjects' names share (0: every name's words are its own)")
    ap.add_argument("--seed", type=int, default=factgpt_large.DEFAULT_SEED)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        ap.error(f"{out} exists; give a new folder (training never overwrites a model)")
    if args.d_model < 1 or args.d_mlp < 1:
        ap.error(f"--d-model {args.d_model} / --d-mlp {args.d_mlp}: expected positive widths")
    if args.d_model % factgpt_large.CONFIG.n_heads:
        ap.error(f"--d-model {args.d_model} must be a multiple of the {factgpt_large.CONFIG.n_heads} heads")
    if args.shared_last_words < 0:
        ap.error(f"--shared-last-words {args.shared_last_words}: expected 0 or more")
    world = replace(factgpt_large.CONFIG.world, shared_last_words=args.shared_last_words)
    config = replace(factgpt_large.CONFIG, d_model=args.d_model, d_mlp=args.d_mlp, world=world)
    start = time.perf_counter()
    info = fill_new_folder(out, lambda tmp: factgpt.train(tmp, seed=args.seed, config=config, progress=True))
    info = {k: v for k, v in info.items() if isinstance(v, (int, float, str))}
    print(json.dumps({**info, "wall_seconds": round(time.perf_counter() - start, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
