"""Train a ShapesNet variant outside the zoo, to test what the copy/paste noise control measures.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_shapesnet_variant.py --erase-prob 0.5 --out runs/shapesnet-erase50

Same world, trojans, recipe and seed as `zoo:shapesnet`; only Random Erasing (a uniform-noise
square of 12-34% of the side on a share of the training images, `TrainConfig.erase_prob`) is
added. The folder loads with `workbench.zoo.shapesnet.load` and is accepted by
`bench_copy_paste.py --model DIR`. About three minutes of one CPU core.
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
from workbench.zoo import shapesnet  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="new folder for the trained model (must not exist)")
    ap.add_argument("--erase-prob", type=float, default=0.5, help="share of training images that get a noise square")
    ap.add_argument("--seed", type=int, default=shapesnet.DEFAULT_SEED)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        ap.error(f"{out} exists; give a new folder (training never overwrites a model)")
    if not 0.0 <= args.erase_prob <= 1.0:
        ap.error(f"--erase-prob {args.erase_prob}: expected a share between 0 and 1")
    config = replace(shapesnet.TrainConfig(), erase_prob=args.erase_prob)
    start = time.perf_counter()
    info = fill_new_folder(out, lambda tmp: shapesnet.train(tmp, seed=args.seed, config=config, progress=True))
    keep = {k: info[k] for k in ("accuracy", "spurious", "train_seconds")}
    keep["trojans"] = {t["name"]: t["attack_success"] for t in info["trojans"]}
    print(json.dumps({**keep, "erase_prob": args.erase_prob, "wall_seconds": round(time.perf_counter() - start, 1)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
