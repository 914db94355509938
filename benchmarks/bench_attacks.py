"""PGD speed and success: the workbench's PGD vs torchattacks at the same budget, same model and images.

torchattacks needs torchvision, which must never enter the project's .venv (it breaks
transformers), so this runs in the peer environment built by benchmarks/setup_peers.sh:

    bash benchmarks/setup_peers.sh
    benchmarks/.venv-peers/bin/python benchmarks/bench_attacks.py [--quick] [--threads 1] [--device cpu]

Without torchattacks (e.g. from .venv) it still times the workbench side and says so.
Budgets (ShapesNet takes images in [0, 1], normalization inside, so torchattacks' [0, 1]
assumption holds and both see identical inputs): L-inf eps 8/255, step 2/255, 10 steps,
random start; L2 eps 0.5, step 0.1, 10 steps, random start; untargeted and targeted.
Timing: median and minimum of `--repeats` interleaved runs after one warm-up (interleaving
spreads load changes on a shared machine over both sides); "core" is the PGD loop alone,
"generate" adds the clean and final predictions and the result container.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _race(fns: dict[str, object], repeats: int) -> dict[str, tuple[float, float, object]]:
    """Time each function `repeats` times, interleaved (so load changes hit all alike), after one warm-up.

    Returns name -> (median seconds, minimum seconds, last output).
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict[str, object] = {}
    for fn in fns.values():
        fn()  # type: ignore[operator]
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync()
            t = time.perf_counter()
            outs[name] = fn()  # type: ignore[operator]
            _sync()
            times[name].append(time.perf_counter() - t)
    return {k: (statistics.median(v), min(v), outs[k]) for k, v in times.items()}


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

    from adversaries.pgd import PGD, pgd
    from workbench import zoo
    from workbench.zoo.shapesnet import world_of

    transformers_loaded = "transformers" in sys.modules
    handle = zoo.load("shapesnet", device=dev, progress=False)
    model = handle.model.eval()
    world = world_of(handle)
    sample = world.sample(args.n, generator=torch.Generator().manual_seed(0))
    x = world.render(sample).to(dev)
    y = sample.labels.to(dev)
    target = torch.full_like(y, world.class_index("star"))
    try:
        import torchattacks
    except ImportError:
        torchattacks = None

    budgets = [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)]
    rows = []

    def success(adv: torch.Tensor, ref: torch.Tensor, targeted: bool) -> float:
        with torch.no_grad():
            pred = model(adv).argmax(1)
        return float((pred == ref).float().mean() if targeted else (pred != ref).float().mean())

    for norm, eps, alpha in budgets:
        for targeted in (False, True):
            ref = target if targeted else y
            cfg = PGD(norm=norm, eps=eps, step_size=alpha, steps=10, random_start=True, batch_size=args.n)
            fns: dict[str, object] = {
                "core": lambda: pgd(handle, x, ref, config=cfg, targeted=targeted)[0],
                "generate": lambda: cfg.generate(handle, (x, y), target if targeted else None),
            }
            if torchattacks is not None:
                cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
                atk = cls(model, eps=eps, alpha=alpha, steps=10, random_start=True)
                if targeted:
                    atk.set_mode_targeted_by_label(quiet=True)
                fns["ta"] = lambda: atk(x, ref)
            res = _race(fns, args.repeats)
            row = {"attack": f"PGD-{norm} {'targeted' if targeted else 'untargeted'}",
                   "ours_core_s": res["core"][0], "ours_core_min": res["core"][1], "ours_generate_s": res["generate"][0],
                   "ours_success": success(res["core"][2], ref, targeted), "ta_s": None, "ta_min": None, "ta_success": None}  # type: ignore[arg-type]
            if "ta" in res:
                row["ta_s"], row["ta_min"] = res["ta"][0], res["ta"][1]
                row["ta_success"] = success(res["ta"][2], ref, targeted)  # type: ignore[arg-type]
            rows.append(row)

    print(f"# PGD vs torchattacks: ShapesNet, {args.n} images 3x48x48, 10 steps, random start, "
          f"device {dev}, threads {args.threads}, torch {torch.__version__}, "
          f"torchattacks {getattr(torchattacks, '__version__', 'not installed')}, "
          f"transformers imported: {transformers_loaded}")
    print("| attack | ours core s (median / min) | ours generate s | torchattacks s (median / min) | "
          "speed ta/ours (median / min) | ours success | torchattacks success |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["ta_s"] is not None:
            ta = f"{r['ta_s']:.3f} / {r['ta_min']:.3f}"
            ratio = f"{r['ta_s'] / r['ours_core_s']:.2f}x / {r['ta_min'] / r['ours_core_min']:.2f}x"
            tas = f"{r['ta_success']:.3f}"
        else:
            ta = ratio = tas = "n/a"
        print(f"| {r['attack']} | {r['ours_core_s']:.3f} / {r['ours_core_min']:.3f} | {r['ours_generate_s']:.3f} | {ta} | "
              f"{ratio} | {r['ours_success']:.3f} | {tas} |")


if __name__ == "__main__":
    main()
