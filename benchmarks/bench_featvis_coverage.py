"""Feature visualization coverage: per ShapesNet ReLU site, how many units get a non-trivial image.

For every channel of each ReLU site of the zoo's ShapesNet (3x48x48), three runs with the
same step budget and seed: the workbench's defaults (`visualize(handle, channel(site, c))`:
Fourier start noise `param.INIT_NOISE`, noise in the padding, dead-start restarts), the
workbench's previous defaults (lucid's start noise 0.01, grey padding, no restarts) and
torch-lucent 0.1.8's default `render_vis` (FFT image with decorrelated colour and sd 0.01,
`standard_transforms`, Adam lr 0.05) at the model's own size: `param.image(48)`,
`fixed_image_size=48` instead of the upsample to 224, and `preprocess=False` because
ShapesNet normalizes inside.

A result is non-trivial when the channel's mean activation on the final image (untransformed,
48x48) is > 0 and the image's standard deviation (values in [0, 1]) is above 0.01. The same
measurement is applied to all three tools' final images. "dead on grey" counts channels that
are exactly zero everywhere on a uniform grey (0.5) image.

    bash benchmarks/setup_peers.sh
    benchmarks/.venv-peers/bin/python benchmarks/bench_featvis_coverage.py [--steps 64] [--json-out FILE]

In the project's own .venv (no torchvision) the lucent column is skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_featvis import lucent_available, lucent_hooks_removed, weights_requiring_grad

SITES = ("stem.relu", "layer1.relu1", "layer1.relu2", "layer2.relu1", "layer2.relu2", "layer3.relu1", "layer3.relu2")
STD_MIN = 0.01


def channel_activation(handle: Any, site: str, c: int, unit_images: torch.Tensor) -> float:
    """Mean activation of channel `c` at `site` on images in [0, 1] (ShapesNet's input range)."""
    from workbench.hooks import run_with_cache

    with torch.no_grad():
        _, acts = run_with_cache(handle, unit_images.float(), [site])
    return float(acts[site][0, c].mean())


def nontrivial(activation: float, unit_images: torch.Tensor) -> bool:
    return activation > 0 and float(unit_images.std()) > STD_MIN


def run_workbench(handle: Any, site: str, c: int, steps: int, *, before: bool) -> dict[str, Any]:
    from workbench import featvis as fv
    from workbench.featvis import transforms as T

    kw: dict[str, Any] = {}
    if before:
        size = handle.preprocess.height
        pad, jitter1, jitter2 = (max(1, round(k * size / 224)) for k in (12, 8, 4))  # as default_transforms
        grey = T.robust(pad, jitter1, T.LUCID_SCALES, T.LUCID_ANGLES, jitter2, size, size, value=0.5)
        kw = {"param": fv.Fourier(sd=0.01), "transforms": grey, "restarts": 0}
    res = fv.visualize(handle, fv.channel(site, c), steps=steps, seed=0, progress=False, **kw)
    act = channel_activation(handle, site, c, res.unit_images)
    return {"status": res.status, "restarts": res.restarts, "activation": round(act, 5),
            "std": round(float(res.unit_images.std()), 5), "ok": res.status == "completed" and nontrivial(act, res.unit_images)}


def run_lucent(handle: Any, site: str, c: int, steps: int) -> dict[str, Any]:
    from lucent.optvis import param, render

    model = handle.model
    size = handle.preprocess.height
    torch.manual_seed(0)
    np.random.seed(0)
    with weights_requiring_grad(model, False), lucent_hooks_removed(model):
        out = render.render_vis(model, f"{site.replace('.', '_')}:{c}", param_f=lambda: param.image(size),
                                thresholds=(steps,), preprocess=False, progress=False, show_image=False,
                                fixed_image_size=size)
    img = torch.from_numpy(np.ascontiguousarray(out[-1])).permute(0, 3, 1, 2)
    act = channel_activation(handle, site, c, img)
    return {"activation": round(act, 5), "std": round(float(img.std()), 5), "ok": nontrivial(act, img)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=64, help="optimization steps per unit, the same for every tool")
    ap.add_argument("--sites", default=",".join(SITES), help="comma-separated ReLU sites")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the machine is shared)")
    ap.add_argument("--json-out", default=None, help="also write every unit's row to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import workbench
    from workbench.hooks import run_with_cache

    handle = workbench.load("zoo:shapesnet", device="cpu", progress=False)
    assert not handle.model.training
    have_lucent = lucent_available()
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    grey = torch.full((1, 3, handle.preprocess.height, handle.preprocess.width), 0.5)
    with torch.no_grad():
        _, grey_acts = run_with_cache(handle, grey, sites)
    start = time.perf_counter()
    units: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for site in sites:
        n = grey_acts[site].shape[1]
        rows = []
        for c in range(n):
            row: dict[str, Any] = {"site": site, "channel": c, "dead_on_grey": bool(grey_acts[site][0, c].max() == 0)}
            row["workbench"] = run_workbench(handle, site, c, args.steps, before=False)
            row["workbench_before"] = run_workbench(handle, site, c, args.steps, before=True)
            row["lucent"] = run_lucent(handle, site, c, args.steps) if have_lucent else None
            rows.append(row)
        units += rows
        dead = [r for r in rows if r["dead_on_grey"]]

        def count(tool: str, subset: list[dict[str, Any]]) -> int | None:
            if subset and subset[0][tool] is None:
                return None
            return sum(r[tool]["ok"] for r in subset)

        def median_act(tool: str) -> float | None:
            acts = [r[tool]["activation"] for r in rows if r[tool] is not None and r[tool]["ok"]]
            return round(statistics.median(acts), 3) if acts else None

        summary.append({"site": site, "units": n, "dead_on_grey": len(dead),
                        "workbench": count("workbench", rows), "workbench_before": count("workbench_before", rows),
                        "lucent": count("lucent", rows) if have_lucent else None,
                        "workbench_of_dead": count("workbench", dead), "lucent_of_dead": count("lucent", dead) if have_lucent else None,
                        "workbench_restarted": sum(r["workbench"]["restarts"] > 0 for r in rows),
                        "workbench_failed": sum(r["workbench"]["status"] == "failed" for r in rows),
                        "median_activation_workbench": median_act("workbench"),
                        "median_activation_lucent": median_act("lucent") if have_lucent else None})
        s = summary[-1]
        print(f"# {site}: {s['workbench']}/{n} workbench, {s['lucent']}/{n} lucent, {s['workbench_before']}/{n} before, "
              f"{len(dead)} dead on grey ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"steps": args.steps, "std_min": STD_MIN, "seconds": round(seconds, 1),
                                                   "torch": torch.__version__, "summary": summary, "units": units}, indent=1))

    def cell(v: Any, n: int) -> str:
        return "n/a" if v is None else f"{v}/{n}"

    print(f"# featvis coverage, ShapesNet, {args.steps} steps per unit, seed 0, torch {torch.__version__}, "
          f"{args.threads} thread(s), {seconds:.0f} s")
    print("| site | units | dead on grey | workbench | lucent | workbench before | of the dead: workbench / lucent "
          "| workbench restarted / failed | median activation workbench / lucent |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    tot = {k: 0 for k in ("units", "dead_on_grey", "workbench", "lucent", "workbench_before", "workbench_of_dead",
                          "lucent_of_dead", "workbench_restarted", "workbench_failed")}
    for s in summary:
        n, d = s["units"], s["dead_on_grey"]
        print(f"| {s['site']} | {n} | {d} | {cell(s['workbench'], n)} | {cell(s['lucent'], n)} | "
              f"{cell(s['workbench_before'], n)} | {cell(s['workbench_of_dead'], d)} / {cell(s['lucent_of_dead'], d)} | "
              f"{s['workbench_restarted']} / {s['workbench_failed']} | "
              f"{s['median_activation_workbench']} / {s['median_activation_lucent']} |")
        for k in tot:
            tot[k] = None if tot[k] is None or s[k] is None else tot[k] + s[k]
    n, d = tot["units"], tot["dead_on_grey"]
    print(f"| all | {n} | {d} | {cell(tot['workbench'], n)} | {cell(tot['lucent'], n)} | "
          f"{cell(tot['workbench_before'], n)} | {cell(tot['workbench_of_dead'], d)} / {cell(tot['lucent_of_dead'], d)} | "
          f"{tot['workbench_restarted']} / {tot['workbench_failed']} | |")
    print(f"(non-trivial: mean channel activation on the final untransformed image > 0 and image std > {STD_MIN}; "
          "workbench before: start noise 0.01, grey padding, no restarts)")


if __name__ == "__main__":
    main()
