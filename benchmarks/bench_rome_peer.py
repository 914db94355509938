"""ROME per-edit time and quality beside the original ROME code, interleaved, on one model.

    git clone https://github.com/kmeng01/rome ROME_DIR   # the original code (tested: commit 0874014)
    .venv/bin/python -u benchmarks/bench_rome_peer.py --rome-dir ROME_DIR --n 40 --threads 1

Both editors edit the same layer of the same model with the same key statistics (the
workbench's, whose inverse is handed to the original's `get_inv_cov`, as its in-memory cache
would hold it), the same context templates (handed to its template cache) and the same value
hyper-parameters (the model's shipped ROME options). Each rewrite is edited by one, then the
other (the order alternates), and each edit is scored alone with the workbench's CounterFact
metrics. The first edit of each is a warm-up (statistics, templates) and is not timed.

The original code creates tensors on "cuda"; on a machine without a GPU the benchmark maps
those to the CPU while the original runs (nothing else in it is changed). It also needs
`datasets` at import time for statistics it never computes here; a stub stands in when the
package is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics as stats_mod
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from workbench.counterfact import aggregate_cases, evaluate_rewrites  # noqa: E402
from workbench.models import load  # noqa: E402
from workbench.requests import Rewrite  # noqa: E402


@contextlib.contextmanager
def cuda_to(device: str):
    """While the original code runs, tensors it asks to put on "cuda" go to `device`."""
    import transformers

    def fix(d: Any) -> Any:
        return device if isinstance(d, str) and d.startswith("cuda") else d

    orig_to, orig_zeros, orig_tensor = torch.Tensor.to, torch.zeros, torch.tensor
    orig_be_to = transformers.BatchEncoding.to

    def tensor_to(self, *args, **kwargs):
        args = tuple(fix(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = fix(kwargs["device"])
        return orig_to(self, *args, **kwargs)

    def with_device(fn):
        def wrapped(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = fix(kwargs["device"])
            return fn(*args, **kwargs)
        return wrapped

    torch.Tensor.to = tensor_to
    torch.zeros = with_device(orig_zeros)
    torch.tensor = with_device(orig_tensor)
    transformers.BatchEncoding.to = lambda self, d, *a, **k: orig_be_to(self, fix(d), *a, **k)
    try:
        yield
    finally:
        torch.Tensor.to, torch.zeros, torch.tensor = orig_to, orig_zeros, orig_tensor
        transformers.BatchEncoding.to = orig_be_to


def import_original(rome_dir: Path) -> Any:
    """The original `rome` package (its `util.globals` reads globals.yml from the working folder)."""
    if "datasets" not in sys.modules:
        try:
            import datasets  # noqa: F401
        except ImportError:
            stub = types.ModuleType("datasets")
            stub.load_dataset = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("not used here"))  # type: ignore[attr-defined]
            sys.modules["datasets"] = stub
    work = Path(tempfile.mkdtemp(prefix="rome-globals-"))
    (work / "globals.yml").write_text("RESULTS_DIR: r\nDATA_DIR: d\nSTATS_DIR: s\nHPARAMS_DIR: h\nREMOTE_ROOT_URL: none\n")
    sys.path.insert(0, str(rome_dir))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        import rome
        import rome.compute_u
        import rome.rome_main
    finally:
        os.chdir(cwd)
    return rome


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rome-dir", type=Path, required=True, help="a checkout of github.com/kmeng01/rome")
    ap.add_argument("--model", default="zoo:factgpt")
    ap.add_argument("--n", type=int, default=40, help="rewrites (seed-0 CounterFact records of the model's world)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stat-tokens", type=int, default=20_000,
                    help="key-statistics tokens for a model without shipped ROME options")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from editors.mlp_update import context_templates, key_statistics
    from workbench_protocols.editing import editor_at

    handle = load(args.model, device="cpu", progress=False)
    shipped = (handle.info.get("editor_defaults") or {}).get("rome")
    # A model without measured options (an architecture model) edits a third of the way up, as
    # ROME does GPT-2 XL (17 of 48), with the world's prefixes, on fewer statistics tokens.
    ours = editor_at("rome", handle, None) if shipped else editor_at(
        "rome", handle, None, layer=handle.arch.n_layers // 3, n_prefixes=4, prefix_source="world",
        mom2_n_samples=args.stat_tokens, mom2_corpus="world")
    layer = ours.resolved_layer(handle)
    rome = import_original(args.rome_dir)
    from rome.rome_hparams import ROMEHyperParams

    family = handle.arch.family
    if family != "gpt2":
        raise SystemExit(f"the original ROME code names GPT-2 / GPT-J modules; {args.model} is {family}")
    n_layers = handle.arch.n_layers
    hparams = ROMEHyperParams(
        layers=[layer], fact_token=ours.fact_token, v_num_grad_steps=ours.v_steps, v_lr=ours.v_lr,
        v_loss_layer=n_layers - 1, v_weight_decay=ours.v_weight_decay, clamp_norm_factor=ours.clamp_norm_factor,
        kl_factor=ours.kl_factor, mom2_adjustment=ours.mom2_adjustment, context_template_length_params=[[8, 4]],
        rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
        mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn", ln_f_module="transformer.ln_f",
        lm_head_module="transformer.wte", mom2_dataset="wikipedia", mom2_n_samples=ours.mom2_n_samples,
        mom2_dtype="float32",
    )
    # Same statistics and templates for both.
    key_stats = key_statistics(handle, layer, corpus=ours.mom2_corpus, fact_token=ours.fact_token,
                               n_samples=ours.mom2_n_samples, seed=ours.seed)
    inverse = torch.inverse(key_stats.second_moment).float()
    rome.compute_u.get_inv_cov = lambda *a, **k: inverse
    templates = context_templates(handle, n_prefixes=ours.n_prefixes, length=ours.prefix_length, seed=ours.seed,
                                  source=ours.prefix_source)
    rome.rome_main.CONTEXT_TEMPLATES_CACHE = templates

    records = handle.world.counterfact_records(args.n + 1, seed=args.seed)
    rewrites = [Rewrite.from_counterfact(r) for r in records]
    model = handle.model
    times: dict[str, list[float]] = {"workbench": [], "original": []}
    cases: dict[str, list[Any]] = {"workbench": [], "original": []}

    def run_ours(rw: Rewrite) -> tuple[float, list[Any]]:
        t = time.perf_counter()
        delta = ours.fit(handle, rw, statistics={layer: key_stats})
        seconds = time.perf_counter() - t
        with delta.applied(model):
            scored = evaluate_rewrites(handle, [rw], bootstrap=0).per_case
        return seconds, scored

    def run_original(rw: Rewrite) -> tuple[float, list[Any]]:
        request = {"prompt": rw.prompt.replace(rw.subject, "{}", 1), "subject": rw.subject,
                   "target_new": {"str": rw.target_new}}
        t = time.perf_counter()
        with cuda_to("cpu"), contextlib.redirect_stdout(io.StringIO()):
            deltas = rome.rome_main.execute_rome(model, handle.tokenizer, request, hparams)
        seconds = time.perf_counter() - t
        saved = {}
        with torch.no_grad():
            for name, (u, v) in deltas.items():
                w = model.get_parameter(name)
                saved[name] = w.detach().clone()
                w[...] += rome.rome_main.upd_matrix_match_shape(u.unsqueeze(1) @ v.unsqueeze(0), w.shape)
        try:
            scored = evaluate_rewrites(handle, [rw], bootstrap=0).per_case
        finally:
            with torch.no_grad():
                for name, w0 in saved.items():
                    model.get_parameter(name).copy_(w0)
        return seconds, scored

    runners = {"workbench": run_ours, "original": run_original}
    for i, rw in enumerate(rewrites):
        order = ("workbench", "original") if i % 2 == 0 else ("original", "workbench")
        for who in order:
            seconds, scored = runners[who](rw)
            if i == 0:
                continue  # warm-up
            times[who].append(seconds)
            cases[who] += scored
    result: dict[str, Any] = {"model": args.model, "layer": layer, "n": args.n, "threads": args.threads,
                              "statistics_samples": key_stats.count}
    for who in runners:
        agg = aggregate_cases(cases[who])
        result[who] = {"median_s": stats_mod.median(times[who]), "mean_s": stats_mod.fmean(times[who]),
                       **{k: agg.get(k) for k in ("ES", "PS", "NS", "S")}}
    result["speed_ratio"] = result["original"]["median_s"] / result["workbench"]["median_s"]
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
