"""PGD speed and success: the workbench's PGD vs torchattacks at the same budget, same model, images and seeds.

torchattacks needs torchvision, which must never enter the project's .venv (it breaks
transformers), so this runs in the peer environment built by benchmarks/setup_peers.sh:

    bash benchmarks/setup_peers.sh
    benchmarks/.venv-peers/bin/python benchmarks/bench_attacks.py [--quick] [--threads 1] [--device cpu]

Without torchattacks (e.g. from .venv) it still times the workbench side and says so.
Budgets (ShapesNet takes images in [0, 1], normalization inside, so torchattacks' [0, 1]
assumption holds and both see identical inputs): L-inf eps 8/255, step 2/255, 10 steps,
random start; L2 eps 0.5, step 0.1, 10 steps, random start; untargeted and targeted.

Five ways of running each attack, timed in one process, interleaved (load changes on a
shared machine hit all alike), median and minimum of `--repeats` runs after one warm-up:

- `ta`: torchattacks as users call it, `atk(images, labels)` on ordinary (NCHW-contiguous) images;
- `ta_cl`: torchattacks given the same images in `torch.channels_last` layout (its PGDL2 refuses
  them: `view` on a channels-last tensor; reported as such);
- `core`: the workbench loop `adversaries.pgd.pgd` with its default `channels_last=True`;
- `core_nchw`: the same loop with `channels_last=False` (the memory format is the only change);
- `generate`: `PGD.generate`, the loop plus input checks, the clean and final predictions and the
  result container.

Seeds: ours `PGD(seed=0)`, torchattacks `torch.manual_seed(0)` before every call. Success is
judged for every variant by the same `model(adv).argmax`. The identity columns compare the
images themselves with torchattacks' (`torch.equal`, else the share of pixels that differ and
the largest difference); `generate`'s images are checked equal to `core`'s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("ta", "ta_cl", "core", "core_nchw", "generate")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _race(fns: dict[str, Callable[[], torch.Tensor]], repeats: int) -> dict[str, tuple[float, float, torch.Tensor]]:
    """Time each function `repeats` times, interleaved, after one warm-up: name -> (median s, min s, last output)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, torch.Tensor] = {}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            t = time.perf_counter()
            outs[name] = fn()
            _sync()
            times[name].append(time.perf_counter() - t)
    return {k: (statistics.median(v), min(v), outs[k]) for k, v in times.items()}


def _identity(a: torch.Tensor, b: torch.Tensor) -> str:
    """'identical', or the share of pixels that differ and the largest difference."""
    if torch.equal(a, b):
        return "identical"
    d = (a - b).abs()
    return f"{float((d > 0).float().mean()):.2%} px differ, max {float(d.max()):.3g}"


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 images, 2 repeats")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeats = 64, 2
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    load_start = _load()

    from adversaries.pgd import PGD, pgd
    from workbench import zoo
    from workbench.zoo.shapesnet import world_of

    transformers_loaded = "transformers" in sys.modules
    handle = zoo.load("shapesnet", device=dev, progress=False)
    model = handle.model.eval()
    world = world_of(handle)
    sample = world.sample(args.n, generator=torch.Generator().manual_seed(0))
    x = world.render(sample).to(dev)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y = sample.labels.to(dev)
    target = torch.full_like(y, world.class_index("star"))
    try:
        import torchattacks
    except ImportError:
        torchattacks = None

    def judged(adv: torch.Tensor, ref: torch.Tensor, targeted: bool) -> int:
        with torch.no_grad():
            pred = model(adv).argmax(1)
        return int((pred == ref).sum() if targeted else (pred != ref).sum())

    budgets = [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)]
    rows = []
    errors: set[str] = set()
    for norm, eps, alpha in budgets:
        for targeted in (False, True):
            ref = target if targeted else y
            cfg = PGD(norm=norm, eps=eps, step_size=alpha, steps=10, random_start=True, seed=0, batch_size=args.n)
            nchw = replace(cfg, channels_last=False)
            fns: dict[str, Callable[[], torch.Tensor]] = {
                "core": lambda: pgd(handle, x, ref, config=cfg, targeted=targeted)[0],
                "core_nchw": lambda: pgd(handle, x, ref, config=nchw, targeted=targeted)[0],
                "generate": lambda: cfg.generate(handle, (x, y), target if targeted else None).adversarial,
            }
            refused: dict[str, str] = {}
            if torchattacks is not None:
                cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
                atk = cls(model, eps=eps, alpha=alpha, steps=10, random_start=True)
                if targeted:
                    atk.set_mode_targeted_by_label(quiet=True)

                def ta(images: torch.Tensor) -> torch.Tensor:
                    torch.manual_seed(0)
                    return atk(images, ref)

                fns["ta"] = lambda: ta(x)
                try:
                    ta(x_cl)
                    fns["ta_cl"] = lambda: ta(x_cl)
                except RuntimeError as e:
                    refused["ta_cl"] = f"refused ({type(e).__name__})"
                    errors.add(f"torchattacks.{cls.__name__} on channels-last input: {type(e).__name__}: {e}")
            res = _race(fns, args.repeats)
            if not torch.equal(res["generate"][2], res["core"][2].cpu()):
                raise SystemExit(f"PGD-{norm}: generate's images differ from the core loop's")
            row: dict[str, object] = {"attack": f"PGD-{norm} {'targeted' if targeted else 'untargeted'}",
                                      "refused": refused}
            for k, (med, mn, adv) in res.items():
                row[k] = (med, mn, judged(adv.to(dev), ref, targeted))
            if "ta" in res:
                ta_adv = res["ta"][2]
                row["id_core"] = _identity(res["core"][2], ta_adv)
                row["id_nchw"] = _identity(res["core_nchw"][2], ta_adv)
            rows.append(row)

    n = args.n
    print(f"# PGD vs torchattacks: ShapesNet, {n} images 3x48x48, 10 steps, random start, seed 0, "
          f"device {dev}, threads {args.threads}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"torchattacks {getattr(torchattacks, '__version__', 'not installed')}, "
          f"transformers imported: {transformers_loaded}; load average (1/5/15 min) at start {load_start}, end {_load()}")
    print()
    print("Seconds, median / min of the interleaved repeats (ta_cl: torchattacks on channels-last input):")
    print()
    print("| attack | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---:|" * len(VARIANTS))
    for r in rows:
        cells = []
        for k in VARIANTS:
            if k in r:
                cells.append(f"{r[k][0]:.3f} / {r[k][1]:.3f}")  # type: ignore[index]
            else:
                cells.append(r["refused"].get(k, "n/a"))  # type: ignore[union-attr]
        print(f"| {r['attack']} | " + " | ".join(cells) + " |")
    for e in sorted(errors):
        print(f"\n{e}")
    print()
    print("Speed ratios (time of the first / time of the second: > 1 means the second is faster), median / min; "
          f"successes out of {n}:")
    print()
    pairs = [("ta", "core"), ("ta", "generate"), ("ta_cl", "core"), ("ta_cl", "generate"), ("ta", "ta_cl"),
             ("core_nchw", "core"), ("ta", "core_nchw"), ("generate", "core")]
    print("| attack | " + " | ".join(f"{a}/{b}" for a, b in pairs) + " | success " + " / ".join(VARIANTS) + " |")
    print("|---|" + "---:|" * (len(pairs) + 1))
    for r in rows:
        cells = []
        for a, b in pairs:
            if a in r and b in r:
                cells.append(f"{r[a][0] / r[b][0]:.2f} / {r[a][1] / r[b][1]:.2f}")  # type: ignore[index]
            else:
                cells.append("n/a")
        succ = " / ".join(str(r[k][2]) if k in r else "-" for k in VARIANTS)  # type: ignore[index]
        print(f"| {r['attack']} | " + " | ".join(cells) + f" | {succ} |")
    if torchattacks is not None:
        print()
        print("Images vs torchattacks' (`ta`), same seeds; generate's images equal core's in every row:")
        print()
        print("| attack | core (channels-last) | core_nchw |")
        print("|---|---|---|")
        for r in rows:
            print(f"| {r['attack']} | {r['id_core']} | {r['id_nchw']} |")


if __name__ == "__main__":
    main()
