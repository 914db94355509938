"""Feature visualization speed: workbench.featvis vs torch-lucent, side by side in one process.

Same model (the zoo's ShapesNet, 3x48x48), same objective (a channel at layer2, a channel
at layer3, a class logit), same parameterization (FFT, decorrelated colour, sd 0.01, Adam
lr 0.05, batch 1) and the same transforms (lucid's standard set scaled to 48 px: pad 3 with
grey, jitter 2, scale 0.9-1.1, rotate -10..10 degrees, jitter 2 (lucent needs > 1), then back
to 48x48: lucent's `fixed_image_size=48` upsample, our `fit`). Lucent's ImageNet
preprocessing is off (ShapesNet normalizes inside). Reported: steps per second, median of
the repetitions, and the ratio to lucent two ways: lucent as users call it (the model's
weights require grad, so every step also computes weight gradients) and lucent on a frozen
model (`model.requires_grad_(False)`), which is what the workbench does for itself. Lucent's
`render_vis` registers a forward hook on every module and never removes them; the benchmark
removes them after each call, so no run pays for an earlier run's hooks.

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
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def lucent_available() -> bool:
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


@contextmanager
def lucent_hooks_removed(model: torch.nn.Module) -> Iterator[None]:
    """Remove the forward hooks added inside the block (lucent's `render_vis` leaves one per module)."""
    before = {id(m): set(m._forward_hooks) for m in model.modules()}
    try:
        yield
    finally:
        for m in model.modules():
            for key in [k for k in m._forward_hooks if k not in before[id(m)]]:
                del m._forward_hooks[key]


@contextmanager
def weights_requiring_grad(model: torch.nn.Module, flag: bool) -> Iterator[None]:
    """`requires_grad` of every weight set to `flag` inside the block, restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.requires_grad_(flag)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def run_lucent(model: torch.nn.Module, objective: str, steps: int, size: int, *, frozen: bool = False) -> float:
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
    with weights_requiring_grad(model, not frozen), lucent_hooks_removed(model):
        start = time.perf_counter()
        render.render_vis(model, obj, param_f=lambda: param.image(size, fft=True, decorrelate=True),
                          transforms=tfs, thresholds=(steps,), preprocess=False, progress=False, show_image=False,
                          fixed_image_size=size)
        seconds = time.perf_counter() - start
    assert not any(m._forward_hooks for m in model.modules()), "lucent's hooks were left on the model"
    return steps / seconds


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
    res = fv.visualize(handle, obj, param=fv.Fourier(sd=0.01), transforms=tf, steps=steps, lr=0.05, progress=False,
                       seed=0)
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
    have_lucent = lucent_available()
    objectives = ["channel:layer2:3", "channel:layer3:5", "logit:3"]
    rows = []
    for objective in objectives:
        # warm up both (first-call allocations, lazy imports)
        run_workbench(handle, objective, 8, fused=True)
        if have_lucent:
            run_lucent(handle.model, objective, 8, size)
        ours, ours_sep, theirs, theirs_frozen = [], [], [], []
        for _ in range(reps):  # interleaved so machine load hits all alike
            ours.append(run_workbench(handle, objective, steps, fused=True))
            ours_sep.append(run_workbench(handle, objective, steps, fused=False))
            if have_lucent:
                theirs.append(run_lucent(handle.model, objective, steps, size))
                theirs_frozen.append(run_lucent(handle.model, objective, steps, size, frozen=True))
        row = {"objective": objective, "steps": steps, "reps": reps,
               "workbench_steps_per_s": round(statistics.median(ours), 1),
               "workbench_separate_ops_steps_per_s": round(statistics.median(ours_sep), 1),
               "lucent_steps_per_s": round(statistics.median(theirs), 1) if theirs else None,
               "lucent_frozen_steps_per_s": round(statistics.median(theirs_frozen), 1) if theirs else None}
        for key, lucent_key in (("speedup", "lucent_steps_per_s"), ("speedup_vs_frozen", "lucent_frozen_steps_per_s")):
            row[key] = round(row["workbench_steps_per_s"] / row[lucent_key], 2) if theirs else None
            row[key + "_separate_ops"] = (round(row["workbench_separate_ops_steps_per_s"] / row[lucent_key], 2)
                                          if theirs else None)
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"# featvis speed, ShapesNet 3x{size}x{size}, FFT param, lucid transforms, batch 1, "
          f"torch {torch.__version__}, {args.threads} thread(s), {steps} steps, median of {reps}")
    print(f"{'objective':<18} {'workbench':>10} {'wb sep.ops':>10} {'lucent':>8} {'lucent frz':>10} "
          f"{'speedup':>8} {'vs frozen':>9} {'sep.ops':>8} {'sep.frz':>8}")

    def num(v: float | None, width: int, suffix: str = "") -> str:
        return f"{v:>{width - len(suffix)}.2f}{suffix}" if v is not None else f"{'n/a':>{width}}"

    for r in rows:
        print(f"{r['objective']:<18} {r['workbench_steps_per_s']:>10.1f} {r['workbench_separate_ops_steps_per_s']:>10.1f} "
              f"{num(r['lucent_steps_per_s'], 8)} {num(r['lucent_frozen_steps_per_s'], 10)} "
              f"{num(r['speedup'], 8, 'x')} {num(r['speedup_vs_frozen'], 9, 'x')} "
              f"{num(r['speedup_separate_ops'], 8, 'x')} {num(r['speedup_vs_frozen_separate_ops'], 8, 'x')}")
    print("(steps per second, median; speedup: over lucent as users call it (weights require grad); "
          "vs frozen: over lucent with model.requires_grad_(False))")

if __name__ == "__main__":
    main()
