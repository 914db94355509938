"""`workbench trace ...` and `workbench neurons ...`: locate where a model keeps a fact.

`trace` runs causal tracing and leaves one heatmap PNG per kind plus `trace.json` (all
effects) in `--out`, a new folder (an existing one is refused); `neurons` lists knowledge
neurons from integrated gradients over the MLP neurons, refined across paraphrase prompts.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench_cli.checks import finite_float, new_folder, positive_int, seed_int

TRACE_JSON = "trace.json"


def _load(args: argparse.Namespace) -> Any:
    from workbench.models import load

    return load(args.model, device=args.device, progress=False)


def parse_layers(text: str | None, n_layers: int | None = None) -> list[int] | None:
    """'2', '1,3,5', '0-3' or a mix ('0-2,5'); None or 'all' means every layer."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError(part)
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise WorkbenchError(f"--layers {text!r}: expected layer numbers like '2', '1,3' or '0-3'") from None
    if n_layers is not None:
        bad = [layer for layer in out if not 0 <= layer < n_layers]
        if bad:
            raise WorkbenchError(f"--layers {text!r}: layer(s) {bad} out of range; this model has layers 0..{n_layers - 1}")
    return out


def _trace(args: argparse.Namespace) -> None:
    from workbench.storage import fill_new_folder
    from workbench.tracing import causal_trace
    from workbench.tracing.engine import check_kinds

    out = new_folder(args.out, "--out")
    assert out is not None
    check_kinds(args.kinds)
    handle = _load(args)
    trace = causal_trace(handle, args.prompt, args.subject, target=args.target, kinds=args.kinds, noise=args.noise,
                         n_samples=args.samples, window=args.window, seed=args.seed, batch_size=args.batch_size)

    def fill(tmp: Path) -> list[Path]:
        written = trace.plot(tmp)
        trace.save_json(tmp / TRACE_JSON)
        return [out / p.name for p in written]

    plots = fill_new_folder(out, fill)
    json_path = out / TRACE_JSON
    result = trace.to_json()
    result.update({"model": args.model, "json": str(json_path), "plots": [str(p) for p in plots]})

    def text(r: dict[str, Any]) -> str:
        b, e = r["subject_span"]
        lines = [
            f"{r['model']}: {r['prompt']!r} -> {r['target']!r}  (subject tokens {b}..{e - 1}: {r['tokens'][b:e]})",
            f"clean p = {r['clean_prob']:.4f}, corrupted p = {r['corrupted_prob']:.4f}, "
            f"total effect = {r['total_effect']:.4f}  (noise {r['noise']} x std = {r['noise_std']:.4f}, "
            f"{r['n_samples']} samples, seed {r['seed']})",
        ]
        for kind, peak in r["peaks"].items():
            lines.append(f"  {kind:<6} peak: layer {peak['layer']}, token {peak['token']} ({peak['token_text']!r}), "
                         f"indirect effect {peak['effect']:.4f}")
        lines.append(f"wrote {r['json']} and {len(r['plots'])} heatmap(s) in {out}")
        return "\n".join(lines)

    args.emit(args, result, text)


def _neurons(args: argparse.Namespace) -> None:
    from workbench.knowledge_neurons import attribute_neurons

    handle = _load(args)
    layers = parse_layers(args.layers, handle.arch.n_layers)
    attr = attribute_neurons(handle, args.prompt, args.target, layers=layers, steps=args.steps,
                             threshold=args.threshold, share=args.share, method=args.method,
                             batch_size=args.batch_size)
    result = attr.to_json()
    result["model"] = args.model
    result["top"] = [n._asdict() for n in attr.top(args.top)]
    result["top_unrefined"] = [n._asdict() for n in attr.ranked(args.top)]

    def text(r: dict[str, Any]) -> str:
        lines = [f"{r['model']}: {len(r['prompts'])} prompt(s) -> {r['target']!r}; layers {r['layers'][0]}..{r['layers'][-1]}, "
                 f"{r['steps']} steps, threshold {r['threshold']} x max, shared by >= {r['share']:.0%} of prompts"]
        for p in r["per_prompt"]:
            lines.append(f"  p={p['prob']:.4f}  max attribution {p['max_score']:.4g}  {len(p['kept'])} above threshold  {p['prompt']!r}")
        if r["top"]:
            lines.append(f"knowledge neurons ({len(r['neurons'])} refined, top {len(r['top'])}):")
            lines += [f"  layer {n['layer']:>3}  neuron {n['neuron']:>6}  attribution {n['score']:.4g}" for n in r["top"]]
        else:
            lines.append("no neuron passed both filters; best by mean attribution:")
            lines += [f"  layer {n['layer']:>3}  neuron {n['neuron']:>6}  attribution {n['score']:.4g}" for n in r["top_unrefined"]]
        return "\n".join(lines)

    args.emit(args, result, text)


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], emit: Callable[..., None]) -> None:
    p = sub.add_parser("trace", help="causal tracing of one fact: heatmaps + JSON of the effects")
    p.add_argument("model", help="zoo:factgpt, a local Hugging Face folder or a hub name")
    p.add_argument("--prompt", required=True, help="the prompt, with {} for the subject or containing it")
    p.add_argument("--subject", required=True, help="the subject whose token embeddings are corrupted")
    p.add_argument("--target", default=None, help="answer to trace (default: the model's top-1 next token)")
    p.add_argument("--kinds", default="hidden,mlp,attn", help="comma list of hidden, mlp, attn (default: all)")
    p.add_argument("--noise", type=finite_float, default=3.0,
                   help="noise std as a multiple of the embedding std (default 3)")
    p.add_argument("--samples", type=positive_int, default=10, help="noise draws (default 10)")
    p.add_argument("--window", type=positive_int, default=10, help="layers restored together for mlp/attn (default 10)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="rows per forward pass (default: from a memory budget)")
    p.add_argument("--out", required=True, help="folder for trace_<kind>.png and trace.json")
    common(p)
    p.set_defaults(func=_trace, emit=emit)

    p = sub.add_parser("neurons", help="knowledge neurons of a fact (integrated gradients over MLP neurons)")
    p.add_argument("model", help="zoo:factgpt, a local Hugging Face folder or a hub name")
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt whose next token is the target; repeat for paraphrases")
    p.add_argument("--target", required=True, help="the answer (its first token is attributed)")
    p.add_argument("--layers", default=None, help="layers to attribute: '2', '1,3' or '0-3' (default: all)")
    p.add_argument("--steps", type=positive_int, default=20, help="integration steps (default 20, as the paper)")
    p.add_argument("--threshold", type=finite_float, default=0.2,
                   help="keep neurons above this x the max (default 0.2)")
    p.add_argument("--share", type=finite_float, default=0.5,
                   help="keep neurons found for >= this share of prompts (default 0.5)")
    p.add_argument("--method", default="riemann_right",
                   choices=("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid", "gausslegendre"))
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="rows per IG pass (default: all steps at once)")
    p.add_argument("--top", type=positive_int, default=10, help="how many neurons to list (default 10)")
    common(p)
    p.set_defaults(func=_neurons, emit=emit)
