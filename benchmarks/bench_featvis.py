"""Feature visualization speed: workbench.featvis vs torch-lucent, side by side in one process.

Same model (the zoo's ShapesNet, 3x48x48), same objective (a channel at layer2, a channel
at layer3, a class logit), same parameterization (FFT, decorrelated colour, sd 0.01, Adam
lr 0.05, batch 1) and the same transforms (lucid's standard set scaled to 48 px: pad 3,
jitter 2, scale 0.9-1.1, rotate -10..10 degrees, jitter 2 (lucent needs > 1), then back to 48x48: lucent's
`fixed_image_size=48` upsample, our `fit`). Lucent's ImageNet preprocessing is off
(ShapesNet normalizes inside). Reported: steps per second, median of the repetitions.

    bash benchmarks/setup_peers.sh
    benchmarks/.venv-peers/bin/python benchmarks/bench_featvis.py [--quick]

In the project's own .venv (no torchvision) only the workbench side runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def _lucent_available() -> bool:
    try:
        import kornia
        import lucent.optvis.render  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        print(f"# torch-lucent not importable here ({type(exc).__name__}: {exc}); "
              "run benchmarks/setup_peers.sh and use benchmarks/.venv-peers/bin/python", file=sys.stderr)
        return False
    # lucent 0.1.8 calls kornia's pre-0.5 top-level names; point them at the current API
    import kornia.geometry.transform as kt

    for name in ("get_rotation_matrix2d", "warp_affine"):
        if not hasattr(kornia, name):
            setattr(kornia, name, getattr(kt, name))
    return True


def run_lucent(model: torch.nn.Module, objective: str, steps: int, size: int) -> float:
    from lucent.optvis import objectives, param, render, transform

    scales = [1 + (i - 5) / 50 for i in range(11)]
    angles = list(range(-10, 11)) + 5 * [0]
    tfs = [transform.pad(3, mode="constant", constant_value=0.5), transform.jitter(2),
           transform.random_scale(scales), transform.random_rotate(angles), transform.jitter(2)]
    kind, _, rest = objective.partition(":")
    if kind == "channel":
        layer, c = rest.split(":")
        obj = objectives.channel(layer, int(c))
    else:
        obj = objectives.channel("fc", int(rest))  # a Linear output: lucent's channel = the logit
    torch.manual_seed(0)
    start = time.perf_counter()
    render.render_vis(model, obj, param_f=lambda: param.image(size, fft=True, decorrelate=True),
                      transforms=tfs, thresholds=(steps,), preprocess=False, progress=False, show_image=False,
                      fixed_image_size=size)
    return steps / (time.perf_counter() - start)


def run_workbench(handle, objective: str, steps: int, *, fused: bool) -> float:
    from workbench import featvis as fv
    from workbench.featvis import transforms as T

    size = handle.preprocess.height
    if fused:
        tf = T.robust(3, 2, T.LUCID_SCALES, T.LUCID_ANGLES, 2, size, size)  # the same chain as one resampling
    else:
        tf = T.compose(T.pad(3), T.jitter(2), T.random_scale(T.LUCID_SCALES), T.random_rotate(T.LUCID_ANGLES),
                       T.jitter(2), T.fit(size, size))
    obj = fv.as_objective(objective)
    start = time.perf_counter()
    res = fv.visualize(handle, obj, param=fv.Fourier(), transforms=tf, steps=steps, lr=0.05, progress=False, seed=0)
    assert res.status == "completed", res.message
    return steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and repetitions")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import workbench

    handle = workbench.load("zoo:shapesnet", device="cpu", progress=False)
    size = handle.preprocess.height
    steps = 48 if args.quick else 192
    reps = 1 if args.quick else 3
    have_lucent = _lucent_available()
    objectives = ["channel:layer2:3", "channel:layer3:5", "logit:3"]
    rows = []
    for objective in objectives:
        # warm up both (first-call allocations, lazy imports)
        run_workbench(handle, objective, 8, fused=True)
        if have_lucent:
            run_lucent(handle.model, objective, 8, size)
        ours, ours_sep, theirs = [], [], []
        for _ in range(reps):  # interleaved so machine load hits both alike
            ours.append(run_workbench(handle, objective, steps, fused=True))
            ours_sep.append(run_workbench(handle, objective, steps, fused=False))
            if have_lucent:
                theirs.append(run_lucent(handle.model, objective, steps, size))
        row = {"objective": objective, "steps": steps, "reps": reps,
               "workbench_steps_per_s": round(statistics.median(ours), 1),
               "workbench_separate_ops_steps_per_s": round(statistics.median(ours_sep), 1),
               "lucent_steps_per_s": round(statistics.median(theirs), 1) if theirs else None}
        row["speedup"] = round(row["workbench_steps_per_s"] / row["lucent_steps_per_s"], 2) if theirs else None
        row["speedup_separate_ops"] = (round(row["workbench_separate_ops_steps_per_s"] / row["lucent_steps_per_s"], 2)
                                       if theirs else None)
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"# featvis speed, ShapesNet 3x{size}x{size}, FFT param, lucid transforms, batch 1, "
          f"torch {torch.__version__}, {args.threads} thread(s)")
    print(f"{'objective':<18} {'workbench':>10} {'wb sep.ops':>10} {'lucent':>8} {'speedup':>8} {'sp.sep':>7}")
    for r in rows:
        lu = f"{r['lucent_steps_per_s']:>8.1f}" if r["lucent_steps_per_s"] else f"{'n/a':>8}"
        sp = f"{r['speedup']:>7.2f}x" if r["speedup"] else f"{'n/a':>8}"
        sp2 = f"{r['speedup_separate_ops']:>6.2f}x" if r["speedup_separate_ops"] else f"{'n/a':>7}"
        print(f"{r['objective']:<18} {r['workbench_steps_per_s']:>10.1f} {r['workbench_separate_ops_steps_per_s']:>10.1f} {lu} {sp} {sp2}")
    print("(steps per second, median; target: workbench >= 2x lucent)")


if __name__ == "__main__":
    main()
