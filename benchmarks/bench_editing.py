"""Editing quality, speed and scale on FactGPT: ROME single edits, MEMIT at 500 edits, baselines.

    .venv/bin/python benchmarks/bench_editing.py --n 100 --memit-n 500 --scale 10,100,1000

1. Quality, one rewrite at a time (each measured with only its own delta applied): ROME,
   and FT / FT-L / KN when those editors are registered, against the unedited model, on the
   same FactWorld CounterFact records. Then MEMIT with `--memit-n` rewrites at once.
2. Speed: the first ROME edit at a layer (collects the key statistics) vs the second
   (reads them from the disk cache). Uses a private cache folder so the first is cold.
3. Scale: MEMIT time and peak memory (tracemalloc of Python/torch CPU allocations, and the
   process's max RSS) for each size in `--scale`.

Prints a table; paste the numbers (with this command) into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from editors.registry import available, get  # noqa: E402
from workbench.counterfact import aggregate_cases, bootstrap_intervals, drop_batch_conflicts, evaluate_rewrites  # noqa: E402
from workbench.models import load  # noqa: E402
from workbench.requests import Rewrite  # noqa: E402

KEYS = ("ES", "PS", "NS", "S", "EA", "PA", "NA", "GE")


def _load_model(spec: str) -> Any:
    """A zoo spec, or a FactGPT folder trained outside the zoo (`train_factgpt_variant.py`)."""
    from workbench.zoo import factgpt

    folder = Path(spec).expanduser()
    if folder.is_dir() and (folder / factgpt.WORLD_FILE).is_file():
        return factgpt.load(folder, spec=str(folder))
    return load(spec, device="cpu", progress=True)


def _import_editors() -> None:
    import editors  # noqa: F401  (registers every editor)


def _row(name: str, agg: dict[str, Any], seconds: float | None = None) -> str:
    cells = "".join(f"{('-' if agg.get(k) is None else format(agg[k], '.1f')):>7}" for k in KEYS)
    return f"{name:<22}{cells}" + (f"{seconds:>9.1f}" if seconds is not None else "")


def one_at_a_time(handle: Any, editor: Any, rewrites: list[Rewrite], *, fluency: bool) -> tuple[dict, list, float]:
    cases = []
    start = time.perf_counter()
    failures = 0
    for rw in rewrites:
        try:
            delta = editor.fit(handle, rw)
        except Exception as exc:  # a refused (degenerate) edit counts as a failed case
            logging.warning("%s refused case %s: %s", type(editor).__name__, rw.case_id, exc)
            failures += 1
            cases += evaluate_rewrites(handle, [rw], fluency=fluency, bootstrap=0).per_case
            continue
        with delta.applied(handle.model):
            cases += evaluate_rewrites(handle, [rw], fluency=fluency, bootstrap=0).per_case
    agg = aggregate_cases(cases)
    agg["refused"] = failures
    return agg, cases, time.perf_counter() - start


def _peak(fn: Any) -> tuple[Any, float, float, float]:
    tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out, seconds, peak / 2**20, rss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="rewrites edited one at a time")
    ap.add_argument("--memit-n", type=int, default=500, help="rewrites MEMIT edits at once")
    ap.add_argument("--scale", default="10,100,1000", help="MEMIT sizes for time/memory")
    ap.add_argument("--seed", type=int, default=0, help="which facts are rewritten")
    ap.add_argument("--model", default="zoo:factgpt",
                    help="a FactGPT zoo model (zoo:factgpt-large has room for 500 distinct-subject rewrites), "
                         "or a FactGPT folder trained by train_factgpt_variant.py")
    ap.add_argument("--distinct-subjects", action="store_true",
                    help="rewrite each subject at most once (CounterFact's and MEMIT's protocol)")
    ap.add_argument("--methods", default="rome,ft,ft-l,kn", help="single-edit methods (skipped if not registered)")
    ap.add_argument("--rome", default='{"layer": 0, "fact_token": "subject_last", "n_prefixes": 4, '
                                      '"prefix_source": "world"}',
                    help="ROME config as JSON")
    ap.add_argument("--memit", default='{"layers": [0], "fact_token": "subject_last", "n_prefixes": 4, '
                                       '"prefix_source": "world", "value_contexts": "plain", "clamp_norm_factor": 1.5}',
                    help="MEMIT config as JSON")
    ap.add_argument("--fluency", action="store_true", help="also measure GE (slower)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: quality,memit,speed,scale")
    ap.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    torch.set_num_threads(args.threads)
    _import_editors()
    skip = set(filter(None, args.skip.split(",")))
    handle = _load_model(args.model)
    world = handle.info.get("world")
    if world is None:
        ap.error(f"{args.model} has no FactWorld; use a FactGPT zoo model (zoo:factgpt, zoo:factgpt-large)")
    out: dict[str, Any] = {"command": " ".join(sys.argv), "model": args.model,
                           "zoo": {k: handle.info.get(k) for k in ("version", "accuracy", "steps", "n_layers")}}
    rome_cfg = json.loads(args.rome)
    memit_cfg = json.loads(args.memit)
    if "layers" in memit_cfg:
        memit_cfg["layers"] = tuple(memit_cfg["layers"])

    records = world.counterfact_records(max(args.n, args.memit_n), seed=args.seed,
                                        distinct_subjects=args.distinct_subjects)
    rewrites = [Rewrite.from_counterfact(r) for r in records]
    head = f"{'':<22}" + "".join(f"{k:>7}" for k in KEYS) + f"{'seconds':>9}"

    if "quality" not in skip:
        subset = rewrites[: args.n]
        base = evaluate_rewrites(handle, subset, fluency=args.fluency, bootstrap=0)
        print(f"\n== one rewrite at a time, {len(subset)} FactWorld rewrites ==")
        print(head)
        print(_row("unedited", base.aggregate))
        out["unedited"] = base.aggregate
        out["quality"] = {}
        for method in args.methods.split(","):
            if method not in available():
                print(f"{method:<22}(not registered)")
                continue
            cls = get(method)
            editor = cls(**rome_cfg) if method == "rome" else _default_layer_editor(cls, handle, rome_cfg)
            agg, cases, secs = one_at_a_time(handle, editor, subset, fluency=args.fluency)
            ci = bootstrap_intervals(cases, seed=0)
            print(_row(method, agg, secs) + (f"   refused {agg['refused']}" if agg.get("refused") else ""))
            out["quality"][method] = {"metrics": agg, "intervals": ci, "seconds": secs,
                                      "config": _config(editor)}

    if "memit" not in skip and "memit" in available():
        subset = rewrites[: args.memit_n]
        cls = get("memit")
        editor = cls(**memit_cfg)
        base = evaluate_rewrites(handle, subset, fluency=args.fluency, bootstrap=0)
        start = time.perf_counter()
        delta = editor.fit(handle, subset)
        fit_s = time.perf_counter() - start
        with delta.applied(handle.model):
            edited = evaluate_rewrites(handle, subset, fluency=args.fluency, bootstrap=0)
        clean, dropped = drop_batch_conflicts(subset, world.subjects)
        clean = [rw for rw in clean if rw.neighborhood_prompts]
        with delta.applied(handle.model):
            clean_edited = evaluate_rewrites(handle, clean, fluency=False, bootstrap=0).aggregate
        clean_base = evaluate_rewrites(handle, clean, fluency=False, bootstrap=0).aggregate
        print(f"\n== MEMIT, {len(subset)} rewrites at once ==")
        print(head)
        print(_row("unedited", base.aggregate))
        print(_row("memit", edited.aggregate, fit_s))
        print(f"neighbourhood prompts about facts this batch rewrites: {dropped} (dropped below)")
        print(_row("unedited (clean nbrs)", clean_base))
        print(_row("memit (clean nbrs)", clean_edited))
        out["memit_clean_neighbours"] = {"dropped": dropped, "unedited": clean_base, "metrics": clean_edited}
        out["memit"] = {"n": len(subset), "unedited": base.aggregate, "metrics": edited.aggregate,
                        "intervals": bootstrap_intervals(edited.per_case, seed=0), "fit_seconds": fit_s,
                        "config": _config(editor), "per_layer": delta.extra["per_layer"]}

    if "speed" not in skip:
        import os

        from editors.rome import ROME

        with tempfile.TemporaryDirectory() as cache:
            old = os.environ.get("WORKBENCH_CACHE")
            os.environ["WORKBENCH_CACHE"] = cache
            try:
                editor = ROME(**rome_cfg)
                t0 = time.perf_counter()
                first = editor.fit(handle, rewrites[0])
                t1 = time.perf_counter()
                second = editor.fit(handle, rewrites[1])
                t2 = time.perf_counter()
            finally:
                if old is None:
                    os.environ.pop("WORKBENCH_CACHE", None)
                else:
                    os.environ["WORKBENCH_CACHE"] = old
        print("\n== ROME speed, same layer, cold statistics cache ==")
        print(f"first edit  {t1 - t0:7.2f} s (statistics {first.extra['timings']['statistics_s']:.2f} s, "
              f"{first.extra['statistics_samples']} tokens)")
        print(f"second edit {t2 - t1:7.2f} s (statistics {second.extra['timings']['statistics_s']:.2f} s, from cache)")
        out["speed"] = {"first_s": t1 - t0, "second_s": t2 - t1, "first_timings": first.extra["timings"],
                        "second_timings": second.extra["timings"]}

    if "scale" not in skip and "memit" in available():
        cls = get("memit")
        sizes = [int(s) for s in args.scale.split(",") if s]
        pool = [Rewrite.from_counterfact(r) for r in world.counterfact_records(max(sizes), seed=args.seed + 1)]
        editor = cls(**memit_cfg)
        editor.fit(handle, pool[:2])  # statistics cached; the scale numbers are the edits themselves
        print("\n== MEMIT scale (statistics already cached) ==")
        print(f"{'edits':>6}{'seconds':>10}{'tracemalloc peak MiB':>22}{'max RSS MiB':>13}{'ES':>7}")
        out["scale"] = []
        for n in sizes:
            delta, secs, peak, rss = _peak(lambda n=n: editor.fit(handle, pool[:n]))
            with delta.applied(handle.model):
                es = evaluate_rewrites(handle, pool[:n], fluency=False, bootstrap=0).aggregate["ES"]
            print(f"{n:>6}{secs:>10.1f}{peak:>22.1f}{rss:>13.0f}{es:>7.1f}")
            out["scale"].append({"n": n, "seconds": secs, "tracemalloc_peak_mib": peak, "max_rss_mib": rss, "ES": es,
                                 "timings": delta.extra["timings"]})
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


def _default_layer_editor(cls: type, handle: Any, rome_cfg: dict[str, Any]) -> Any:
    """Baselines at the same layer as ROME when they take one (their other options: their defaults)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {"layer": rome_cfg["layer"]} if "layer" in fields and "layer" in rome_cfg else {}
    return cls(**kwargs)


def _config(editor: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(editor).items()}


if __name__ == "__main__":
    raise SystemExit(main())
