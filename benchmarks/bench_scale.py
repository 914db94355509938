"""How the workbench's costs grow with model size: statistics, tracing, ROME, MEMIT.

    .venv/bin/python -u benchmarks/bench_scale.py --models zoo:factgpt,zoo:gpt2-small-arch,zoo:gpt2-medium-arch \
        --stages statistics,trace,rome,memit --memit-sizes 100 --threads 1 --out benchmarks/out/scale.json
    .venv/bin/python -u benchmarks/bench_scale.py --models zoo:gpt2-small-arch --stages memit --memit-sizes 10,100,1000
    .venv/bin/python -u benchmarks/bench_scale.py --models zoo:gpt2-small-arch --stages statistics-peer,resume \
        --rome-dir ROME_DIR

Each (model, stage) runs in a fresh process, so its peak memory (max RSS) is its own; the
architecture models have random weights (timing and memory only). Stages:

- `statistics`: ROME's key statistics at the edit layer over `--stat-tokens` tokens of the
  world corpus, cold (a private cache folder): seconds and tokens/s; then the same request
  again (found in memory) and after forgetting the memory (read from disk), with the number of
  forward passes each made (0: no pass over the corpus).
- `statistics-peer`: the original ROME code's `layer_stats` on the same model, layer, texts and
  precision (float64), interleaved with ours, tokens/s each (needs `--rome-dir`).
- `resume`: a statistics collection killed (SIGKILL) once its first checkpoint exists, then run
  again: how many batches the second run computed and its time, beside an uninterrupted run.
- `trace`: one causal trace (hidden, MLP and attention, 10 noise samples) of a world fact.
- `kn`: knowledge-neuron attribution (integrated gradients, 20 steps) of one fact, every layer.
- `trigger`: a 3-token text-trigger search (GCG, 10 steps) on 4 prompts, the input optimization
  that feature visualization does for images.
- `rome`: ROME edits at the layer (statistics given, so only the edit is timed): median seconds.
- `memit`: MEMIT at each of `--memit-sizes` edits at once (statistics given): seconds, per edit.

The edit layer is the shipped one for a trained zoo model, else a third of the depth (ROME's
GPT-2 XL layer 17 of 48). ROME/MEMIT use 4 world prefixes on every model, so only the size changes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics as stats_mod
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("statistics", "statistics-peer", "resume", "trace", "kn", "trigger", "rome", "memit")


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _edit_layer(handle: Any) -> int:
    shipped = (handle.info.get("editor_defaults") or {}).get("rome", {})
    return int(shipped["layer"]) if "layer" in shipped else handle.arch.n_layers // 3


def _rewrites(handle: Any, n: int, seed: int = 0) -> list[Any]:
    from workbench.requests import Rewrite

    return [Rewrite.from_counterfact(r) for r in handle.world.counterfact_records(n, seed=seed)]


class ForwardCount:
    def __init__(self, model: Any) -> None:
        self.calls = 0
        model.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def _texts(handle: Any, tokens: int) -> list[str]:
    return list(handle.world.iter_corpus(max(64, tokens // 4), seed=0))


def stage_statistics(handle: Any, args: argparse.Namespace) -> dict[str, Any]:
    from editors.mlp_update import key_site
    from workbench.statistics import collect_statistics, forget_all

    layer = _edit_layer(handle)
    texts = _texts(handle, args.stat_tokens)
    counter = ForwardCount(handle.model)
    with tempfile.TemporaryDirectory() as cache:
        t = time.perf_counter()
        cold = collect_statistics(handle, key_site(layer), texts, n_samples=args.stat_tokens, batch_size=64,
                                  cache=cache, progress=False)
        cold_s = time.perf_counter() - t
        passes_cold = counter.calls
        t = time.perf_counter()
        collect_statistics(handle, key_site(layer), texts, n_samples=args.stat_tokens, batch_size=64, cache=cache,
                           progress=False)
        memory_s = time.perf_counter() - t
        passes_memory = counter.calls - passes_cold
        forget_all()
        t = time.perf_counter()
        collect_statistics(handle, key_site(layer), texts, n_samples=args.stat_tokens, batch_size=64, cache=cache,
                           progress=False)
        disk_s = time.perf_counter() - t
        passes_disk = counter.calls - passes_cold - passes_memory
    return {"layer": layer, "dim": int(cold.mean.shape[0]), "tokens": cold.count, "cold_s": cold_s,
            "tokens_per_s": cold.count / cold_s, "forward_passes_cold": passes_cold,
            "memory_hit_s": memory_s, "forward_passes_memory_hit": passes_memory,
            "disk_hit_s": disk_s, "forward_passes_disk_hit": passes_disk}


def stage_statistics_peer(handle: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Ours and the original `layer_stats`, alternating, on the same texts, float64 both."""
    import types

    import torch

    from editors.mlp_update import key_site
    from workbench.statistics import collect_statistics, forget_all

    if args.rome_dir is None:
        raise SystemExit("statistics-peer needs --rome-dir (a checkout of github.com/kmeng01/rome)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_rome_peer import cuda_to, import_original

    if handle.arch.family != "gpt2":
        raise SystemExit("the original layer_stats names GPT-2 modules; use a GPT-2 model")
    layer = _edit_layer(handle)
    texts = _texts(handle, args.stat_tokens)
    datasets = types.ModuleType("datasets")
    datasets.load_dataset = lambda *a, **k: {"train": [{"text": t} for t in texts]}  # type: ignore[attr-defined]
    sys.modules["datasets"] = datasets
    import_original(args.rome_dir)
    import rome.layer_stats as peer

    peer.load_dataset = datasets.load_dataset
    handle.model.config.n_positions = getattr(handle.model.config, "n_positions", 1024)
    rows: dict[str, list[float]] = {"workbench": [], "original": []}
    counts: dict[str, int] = {}
    for rep in range(args.repeats):
        for who in (("workbench", "original") if rep % 2 == 0 else ("original", "workbench")):
            with tempfile.TemporaryDirectory() as cache:
                t = time.perf_counter()
                if who == "workbench":
                    forget_all()
                    s = collect_statistics(handle, key_site(layer), texts, batch_size=64, cache=cache, progress=False)
                    counts[who] = s.count
                else:
                    with cuda_to("cpu"), torch.no_grad():
                        stat = peer.layer_stats(handle.model, handle.tokenizer, f"transformer.h.{layer}.mlp.c_proj",
                                                cache, "wikitext", ["mom2"], model_name="bench", sample_size=len(texts),
                                                precision="float64", download=False,
                                                progress=lambda it, total=None: it)
                    counts[who] = int(stat.mom2.count)
                rows[who].append(time.perf_counter() - t)
    out: dict[str, Any] = {"layer": layer, "texts": len(texts)}
    for who, secs in rows.items():
        out[who] = {"tokens": counts[who], "median_s": stats_mod.median(secs),
                    "tokens_per_s": counts[who] / stats_mod.median(secs)}
    out["throughput_ratio"] = out["workbench"]["tokens_per_s"] / out["original"]["tokens_per_s"]
    return out


def stage_resume(handle: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Kill a collection after its first checkpoint, rerun, compare with an uninterrupted run."""
    with tempfile.TemporaryDirectory() as cache:
        cmd = [sys.executable, __file__, "--worker-collect", args.model_spec, "--cache", cache,
               "--stat-tokens", str(args.stat_tokens), "--threads", str(args.threads)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        stats_dir = Path(cache) / "stats"
        t = time.perf_counter()
        while proc.poll() is None and not list(stats_dir.glob("*.partial.safetensors")):
            time.sleep(0.05)
        killed_after = time.perf_counter() - t
        if proc.poll() is not None:
            raise SystemExit("the collection finished before its first checkpoint; raise --stat-tokens")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    with tempfile.TemporaryDirectory() as cache:
        whole = json.loads(subprocess.run([*cmd[:5], cache, *cmd[6:]], check=True, capture_output=True,
                                          text=True).stdout)
    return {"killed_after_s": killed_after, "resumed": resumed, "uninterrupted": whole,
            "same_bits": resumed["digest"] == whole["digest"]}


def worker_collect(args: argparse.Namespace) -> None:
    from editors.mlp_update import key_site
    from workbench.fingerprint import tensor_digest
    from workbench.models import load
    from workbench.statistics import collect_statistics

    handle = load(args.worker_collect, device="cpu", progress=False)
    layer = _edit_layer(handle)
    counter = ForwardCount(handle.model)
    t = time.perf_counter()
    s = collect_statistics(handle, key_site(layer), _texts(handle, args.stat_tokens), n_samples=args.stat_tokens,
                           batch_size=64, cache=args.cache, checkpoint_every=2, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t, "forward_passes": counter.calls, "tokens": s.count,
                      "digest": tensor_digest(s.second_moment)}))


def _statistics_for(handle: Any, layers: list[int], tokens: int) -> dict[int, Any]:
    from editors.mlp_update import key_statistics

    return {layer: key_statistics(handle, layer, corpus="world", n_samples=tokens) for layer in layers}


def stage_trace(handle: Any, args: argparse.Namespace) -> dict[str, Any]:
    from workbench.tracing.engine import causal_trace

    rw = _rewrites(handle, 1)[0]
    t = time.perf_counter()
    result = causal_trace(handle, rw.prompt, rw.subject, n_samples=10)
    return {"seconds": time.perf_counter() - t, "tokens": len(result.tokens) if hasattr(result, "tokens") else None}


def stage_kn(handle: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Knowledge-neuron attribution (integrated gradients, 20 steps) of one fact over every layer's MLP."""
    from workbench.knowledge_neurons import attribute_neurons

    rw = _rewrites(handle, 1)[0]
    t = time.perf_counter()
    attribute_neurons(handle, rw.prompt, rw.target_true, steps=20)
    return {"seconds": time.perf_counter() - t, "layers": handle.arch.n_layers, "neurons_per_layer": handle.arch.d_mlp}


def stage_trigger(handle: Any, args: argparse.Namespace) -> dict[str, Any]:
    """A 3-token trigger search (GCG, 10 steps) toward an object on 4 of the world's prompts: the
    optimization over inputs that feature visualization does for images."""
    from adversaries.text_triggers import TextTrigger

    rewrites = _rewrites(handle, 4)
    t = time.perf_counter()
    TextTrigger(steps=10, n_controls=2).generate(handle, [rw.prompt for rw in rewrites], rewrites[0].target_new)
    return {"seconds": time.perf_counter() - t, "steps": 10}


def stage_rome(handle: Any, args: argparse.Namespace) -> dict[str, Any]:
    from workbench_protocols.editing import editor_at

    layer = _edit_layer(handle)
    stats = _statistics_for(handle, [layer], args.stat_tokens)
    rome = editor_at("rome", handle, None, layer=layer, n_prefixes=4, prefix_source="world",
                     mom2_n_samples=args.stat_tokens, mom2_corpus="world")
    times, steps = [], []
    for rw in _rewrites(handle, args.rome_edits + 1)[: args.rome_edits + 1]:
        t = time.perf_counter()
        delta = rome.fit(handle, rw, statistics=stats)
        times.append(time.perf_counter() - t)
        steps.append(delta.extra["v_steps_taken"])
    return {"layer": layer, "edits": args.rome_edits, "median_s": stats_mod.median(times[1:]),
            "first_s": times[0], "v_steps": steps[1:]}


def stage_memit(handle: Any, args: argparse.Namespace) -> dict[str, Any]:
    from editors.memit import default_layers
    from workbench_protocols.editing import editor_at

    layers = list(default_layers(handle.arch.n_layers)) if handle.arch.n_layers > 4 else None
    memit = editor_at("memit", handle, None, **({"layers": tuple(layers)} if layers else {}),
                      n_prefixes=4, prefix_source="world", mom2_n_samples=args.stat_tokens, mom2_corpus="world")
    used = list(memit.resolved_layers(handle))
    stats = _statistics_for(handle, used, args.stat_tokens)
    out: dict[str, Any] = {"layers": used, "sizes": {}}
    for n in args.memit_sizes:
        rewrites = _rewrites(handle, n, seed=1)
        t = time.perf_counter()
        delta = memit.fit(handle, rewrites, statistics=stats)
        seconds = time.perf_counter() - t
        out["sizes"][str(n)] = {"edits": len(rewrites), "seconds": seconds, "per_edit_s": seconds / len(rewrites),
                                "timings": delta.extra.get("timings")}
    return out


def run_stage(args: argparse.Namespace) -> None:
    import torch

    from workbench.models import load

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    handle = load(args.model_spec, device=args.device, progress=False,
                  **({"device_map": "auto"} if args.device_map_auto else {}))
    load_s = time.perf_counter() - t
    fn = {"statistics": stage_statistics, "statistics-peer": stage_statistics_peer, "resume": stage_resume,
          "trace": stage_trace, "kn": stage_kn, "trigger": stage_trigger, "rome": stage_rome,
          "memit": stage_memit}[args.stage]
    result = fn(handle, args)
    params = sum(p.numel() for p in handle.model.parameters())
    gpu = {"cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {}
    print(json.dumps({"model": args.model_spec, "stage": args.stage, "device": str(handle.device), "parameters": params,
                      "load_s": load_s, "max_rss_mb": _max_rss_mb(), **gpu, **result}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="zoo:factgpt,zoo:gpt2-small-arch,zoo:gpt2-medium-arch")
    ap.add_argument("--stages", default="statistics,trace,rome,memit")
    ap.add_argument("--memit-sizes", default="100")
    ap.add_argument("--stat-tokens", type=int, default=20_000, help="key-statistics tokens (ROME's default: 100,000)")
    ap.add_argument("--rome-edits", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--device-map-auto", action="store_true", help="spread an architecture model with accelerate")
    ap.add_argument("--rome-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--model-spec", help=argparse.SUPPRESS)
    ap.add_argument("--worker-collect", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.memit_sizes = [int(x) for x in str(args.memit_sizes).split(",") if x]
    if args.worker_collect:
        import torch

        torch.set_num_threads(args.threads)
        worker_collect(args)
        return
    if args.stage:
        run_stage(args)
        return
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; expected some of {', '.join(STAGES)}")
    results = []
    for model in [m for m in args.models.split(",") if m]:
        for stage in stages:
            cmd = [sys.executable, __file__, "--stage", stage, "--model-spec", model,
                   "--memit-sizes", ",".join(map(str, args.memit_sizes)), "--stat-tokens", str(args.stat_tokens),
                   "--rome-edits", str(args.rome_edits), "--repeats", str(args.repeats), "--threads", str(args.threads),
                   "--device", args.device, *(["--device-map-auto"] if args.device_map_auto else [])]
            if args.rome_dir is not None:
                cmd += ["--rome-dir", str(args.rome_dir)]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if done.returncode != 0:
                print(f"{model} {stage}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
