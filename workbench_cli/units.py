"""`workbench units | ablate | erase | steer | rewrite`: neuron and representation editors.

    workbench units zoo:shapesnet --site layer2.relu2 --trojan style-universal --method activation_difference
    workbench ablate zoo:shapesnet --trojan patch-square --json          # trojan surgery + random control
    workbench ablate zoo:shapesnet --trojan patch-universal --method greedy   # units across sites
    workbench ablate ./my-gpt2 --site blocks.3.mlp.hook_post --units 12,40 --out d.delta
    workbench erase minilm --site blocks.3.mlp.hook_out --concept sentiment --json
    workbench steer minilm --site blocks.3.mlp.hook_out --concept sentiment --strengths -2,-1,0,1,2
    workbench rewrite zoo:shapesnet --layer fc --rank 2 --json

Each command fits a WeightDelta, saves it (`--out`, default `./<command>.delta.safetensors`;
an existing file is refused, never written over) and prints before/after metrics. Bad input
(unknown site, units out of range, a site that cannot be folded into weights, single-class
concept data) exits 2 with one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench_cli.checks import finite_float, int_list, new_file, positive_int, seed_int, threads

log = logging.getLogger(__name__)

CONCEPTS = ("sentiment", "topic")
DELTA_COMMANDS = ("ablate", "erase", "steer", "rewrite")


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise WorkbenchError(f"{what} {text!r}: expected comma-separated finite numbers such as -2,-1,0,1,2")
    return values


def _out(args: argparse.Namespace, command: str) -> Path:
    """Where the delta goes: `--out`, default `./<command>.delta.safetensors`; an existing file is refused."""
    return new_file(args.out or f"{command}.delta.safetensors", "--out")


def _load(args: argparse.Namespace) -> Any:
    import torch

    from workbench.models import load

    if getattr(args, "command", None) in DELTA_COMMANDS:
        _out(args, args.command)  # outputs are checked before any work
    if getattr(args, "plot", None):
        new_file(args.plot, "--plot")
    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, device=args.device, progress=False)


def _world(handle: Any) -> Any:
    from workbench.zoo.shapesnet import world_of

    if handle.kind != "image_classifier" or "world" not in handle.info:
        raise WorkbenchError(f"{handle.spec} is not a ShapesWorld model; --trojan and the rewrite protocol need zoo:shapesnet")
    return world_of(handle)


def _labels(values: Any, key: str, path: str, n_texts: int) -> list[int]:
    """The `key` list of a --data file: one integer class (>= 0) per text."""
    if not isinstance(values, list):
        raise WorkbenchError(f"--data {path}: {key!r} must be a list of integer classes, one per text")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 0]
    if bad:
        raise WorkbenchError(f"--data {path}: {key!r} holds {bad[0]!r}; give integer classes >= 0 (e.g. 0 and 1)")
    if len(values) != n_texts:
        raise WorkbenchError(f"--data {path} has {n_texts} texts and {len(values)} {key}; give exactly one label per "
                             "text")
    return list(values)


def _concept_data(args: argparse.Namespace, n: int) -> tuple[list[str], list[int], list[int] | None, str]:
    """Texts, the labels of the concept, the labels of the other (unrelated) concept, and its name."""
    from editors.concept_erasure import example_sentences

    if args.data:
        path = Path(args.data)
        if not path.is_file():
            raise WorkbenchError(f"--data {args.data}: no such file; give a JSON file {{\"texts\": [...], \"labels\": [...]}}")
        try:
            obj = json.loads(path.read_text())
        except (ValueError, OSError) as exc:
            raise WorkbenchError(f"--data {args.data} is not readable JSON ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("texts"), list) or "labels" not in obj:
            raise WorkbenchError(f"--data {args.data}: expected a JSON object {{\"texts\": [...], \"labels\": [...]}}")
        texts = obj["texts"]
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise WorkbenchError(f"--data {args.data}: 'texts' must be a non-empty list of non-empty strings")
        labels = _labels(obj["labels"], "labels", args.data, len(texts))
        other = obj.get("other_labels")
        return texts, labels, None if other is None else _labels(other, "other_labels", args.data, len(texts)), "other"
    if args.concept not in CONCEPTS:
        raise WorkbenchError(f"--concept {args.concept!r}: choose one of {', '.join(CONCEPTS)} or give --data FILE")
    texts, sentiment, topic = example_sentences(n, seed=args.seed)
    if args.concept == "sentiment":
        return texts, sentiment, topic, "topic"
    return texts, topic, sentiment, "sentiment"


# --- units ------------------------------------------------------------------------------

def _units(args: argparse.Namespace) -> None:
    import torch

    from workbench.sites import resolve_site
    from workbench.unit_selection import select_units

    handle = _load(args)
    resolve_site(handle, args.site)  # an unknown site fails first, listing the valid ones
    kw: dict[str, Any] = {}
    if args.trojan:
        world = _world(handle)
        ti = world.trojans.index(args.trojan)
        t = world.trojans[ti]
        target = world.class_index(t.target)
        pool = [c for c in range(len(world.classes)) if c != target] if t.source is None else [world.class_index(t.source)]
        g = torch.Generator().manual_seed(args.seed)
        sample = world.sample(args.n, generator=g, classes=pool)
        trig = world.implant(sample, ti, generator=g)
        clean_x, trig_x = world.render(sample), world.render(trig)
        from workbench.worlds.shapesworld import Sample

        both = Sample.cat([sample, trig])  # dissection needs images with and without the concept
        kw = {"quantile": args.quantile, "positive": trig_x, "negative": clean_x, "inputs": trig_x, "target": target, "baselines": clean_x,
              "images": torch.cat([clean_x, trig_x]), "masks": world.concept_masks(both), "concept": args.dissect_concept or
              {"patch": "patch", "natural": "trigger"}.get(t.kind, f"texture:{t.trigger.texture}")}
    elif args.concept or args.data:
        texts, labels, _, _ = _concept_data(args, args.n)
        kw = {"positive": [x for x, y in zip(texts, labels) if y == 1], "negative": [x for x, y in zip(texts, labels) if y == 0]}
        if args.target is not None:
            kw.update(inputs=kw["positive"], target=args.target)
    else:
        raise WorkbenchError("give --trojan NAME (ShapesNet) or --concept sentiment|topic / --data FILE (text models)")
    if args.method in ("attribution",) and "target" not in kw:
        raise WorkbenchError("--method attribution on text needs --target TOKEN_ID")
    allowed = {"activation_difference": ("positive", "negative"), "dissection": ("images", "masks", "concept", "quantile"),
               "attribution": ("inputs", "target", "baselines"), "shapley": ("inputs", "target", "negative")}[args.method]
    extra = {"n_samples": args.shapley_samples, "n_candidates": args.candidates} if args.method == "shapley" else {}
    ranking = select_units(handle, args.site, method=args.method, seed=args.seed, progress=not args.json,
                           **{k: v for k, v in kw.items() if k in allowed}, **extra)
    result = ranking.to_json()
    result["units"], result["scores"] = result["units"][: args.k], result["scores"][: args.k]
    if args.plot:
        result["plot"] = str(ranking.plot(args.plot, k=min(args.k, 8)))
    args.emit(args, result, lambda r: f"{r['method']} at {r['site']} ({r['n_units']} units), best first:\n" + "\n".join(
        f"  unit {u:>5}  score {s:.4g}" for u, s in zip(r["units"], r["scores"])))


# --- ablate -------------------------------------------------------------------------------

def _text_inputs(handle: Any) -> list[str]:
    from editors.concept_erasure import example_sentences

    return example_sentences(32, seed=123)[0]


def _output_metric(handle: Any) -> dict[str, float]:
    """A before/after quantity for any model: ShapesNet clean accuracy, or LM loss / embedding drift."""
    import torch

    if handle.kind == "image_classifier" and "world" in handle.info:
        from workbench.zoo.shapesnet import clean_accuracy

        world = _world(handle)
        return {"clean_accuracy": round(clean_accuracy(handle.model, world, n=1000, generator=torch.Generator().manual_seed(7)), 4)}
    if handle.tokenizer is None:
        return {}
    texts = _text_inputs(handle)
    enc = handle.tokenizer(texts, return_tensors="pt", padding=True)
    enc = {k: v.to(handle.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        if handle.kind == "causal_lm":
            out = handle.model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100))
            return {"lm_loss": round(float(out.loss), 5)}
        base = getattr(handle.model, "base_model", handle.model)
        hidden = base(**enc).last_hidden_state
        m = enc["attention_mask"][..., None].float()
        pooled = (hidden * m).sum(1) / m.sum(1)
        return {"pooled_norm": round(float(pooled.norm(dim=-1).mean()), 5), "_pooled": pooled}  # type: ignore[dict-item]


def _ablate(args: argparse.Namespace) -> None:
    from editors.unit_ablation import UnitRequest, unit_delta

    handle = _load(args)
    if args.trojan:
        if args.units:
            raise WorkbenchError("give --trojan (units chosen by selection) or --site/--units, not both")
        from editors.unit_ablation import GateConfig
        from workbench_protocols.surgery import (
            EvaluationConfig,
            MaskConfig,
            SelectionConfig,
            SurgeryConfig,
            trojan_surgery,
        )

        if args.method != "mask" and (args.mask_steps is not None or args.mask_mode != "scale" or args.mask_max_gate is not None):
            raise WorkbenchError("--mask-steps, --mask-mode and --mask-max-gate apply to --method mask only")
        gate_opts = {k: v for k, v in (("steps", args.mask_steps), ("max_gate", args.mask_max_gate)) if v is not None}
        mask = MaskConfig(gates=GateConfig(**gate_opts), mode=args.mask_mode) if args.method == "mask" else MaskConfig()
        config = SurgeryConfig(
            selection=SelectionConfig(method=args.method, site=args.site, n_units=args.n_units, n_select=args.n_select,
                                      n_ref=args.n_ref),
            mask=mask, evaluation=EvaluationConfig(n_eval=args.n_eval, n_clean=args.n_clean, n_random_draws=args.draws),
            seed=args.seed)
        result = trojan_surgery(handle, args.trojan, config=config, return_delta=True, progress=not args.json)
        delta = result.pop("delta")
        result["delta_path"] = str(delta.save(_out(args, "ablate")))
        args.emit(args, result, lambda r: (
            f"trojan {r['trojan']}: {'gated' if any(r.get('factors') or []) else 'removed'} {r['n_units']} unit(s) "
            f"{r['units']} at {r['site']} ({r['method']})\n"
            f"  attack success {r['asr_before']:.3f} -> {r['asr_after']:.3f} (random units: {r['random_asr_after']:.3f})\n"
            f"  clean accuracy {r['clean_before']:.3f} -> {r['clean_after']:.3f}\n"
            + (f"  scaled around the clean mean by factors (<1 toward it, >1 away) {[round(f, 2) for f in r['factors']]}\n"
               if r.get("factors") else "")
            + f"  delta: {r['delta_path']}"))
        return
    if not args.site:
        raise WorkbenchError("give --trojan NAME, or --site SITE --units 1,2,3")
    units = int_list(args.units, "--units")
    values = _floats(args.values, "--values") if args.values else None
    delta = unit_delta(handle, UnitRequest(args.site, tuple(units), None if values is None else tuple(values)),
                       factor=args.factor, side=args.side)
    before = _output_metric(handle)
    with delta.applied(handle.model):
        after = _output_metric(handle)
    result = _before_after(before, after)
    result.update({"site": args.site, "units": units, "factor": args.factor, "side": delta.extra["side"],
                   "params": delta.extra["params"], "delta_path": str(delta.save(_out(args, "ablate")))})
    args.emit(args, result, _format_generic)


def _before_after(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pb, pa = before.pop("_pooled", None), after.pop("_pooled", None)
    for k, v in before.items():
        out[f"{k}_before"] = v
        out[f"{k}_after"] = after.get(k)
        _note_overflow(out, f"{k}_after")
    if pb is not None and pa is not None:
        import torch

        out["pooled_cosine_to_before"] = round(float(torch.nn.functional.cosine_similarity(pb, pa, dim=-1).mean()), 5)
    return out


NOT_FINITE = "not a finite number (JSON null): the edited model's outputs overflowed; use a smaller factor or strength"


def _note_overflow(result: dict[str, Any], key: str) -> None:
    """Say why next to a measured value that is NaN or infinite (JSON output shows it as null)."""
    value = result.get(key)
    if isinstance(value, float) and not math.isfinite(value):
        result[f"{key}_note"] = NOT_FINITE


def _format_generic(r: dict[str, Any]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in r.items())


# --- erase --------------------------------------------------------------------------------

def _erase(args: argparse.Namespace) -> None:
    import torch

    from editors.concept_erasure import (
        ConceptData,
        ConceptErasure,
        fold_target,
        probe_accuracy,
        representations,
        stratified_split,
    )

    handle = _load(args)
    side, module_path, _ = fold_target(handle, args.site)  # exits 2 (with the hook alternative) before any work
    texts, labels, other, other_name = _concept_data(args, args.n)
    train, test = stratified_split(labels, train_share=0.6, seed=args.seed, keys=texts)
    editor = ConceptErasure(args.site, method=args.method, pooling=args.pooling, affine=not args.no_affine)
    delta = editor.fit(handle, ConceptData.of([texts[i] for i in train], [labels[i] for i in train]))
    # A write fold changes the site itself; a read fold changes what the reader computes from it.
    probe_site = args.site if side == "write" else module_path
    y = torch.tensor(labels)
    tr, te = torch.tensor(train, dtype=torch.long), torch.tensor(test, dtype=torch.long)

    def probes() -> dict[str, float]:
        x, _ = representations(handle, probe_site, texts, pooling="mean" if args.pooling == "none" else args.pooling)
        out = {"concept": probe_accuracy(x[tr], y[tr], x[te], y[te])}
        if other is not None:
            yo = torch.tensor(other)
            out["other"] = probe_accuracy(x[tr], yo[tr], x[te], yo[te])
        return out

    before = probes()
    with delta.applied(handle.model):
        after = probes()
    counts = torch.bincount(y[te])
    result = {
        "site": args.site, "fold": side, "module": module_path, "probe_site": probe_site, "method": args.method,
        "concept": args.concept if not args.data else "data", "other_concept": other_name if other is not None else None,
        "n_train": len(train), "n_test": len(test), "split": f"stratified by class, seed {args.seed}",
        "probe_before": round(before["concept"], 4), "probe_after": round(after["concept"], 4),
        "chance": round(float(counts.max()) / float(counts.sum()), 4),
        "other_before": round(before["other"], 4) if "other" in before else None,
        "other_after": round(after["other"], 4) if "other" in after else None,
        "rank": delta.extra.get("rank"), "delta_path": str(delta.save(_out(args, "erase"))),
    }
    args.emit(args, result, lambda r: (
        f"erased {r['concept']} at {r['site']} (folded into {r['module']}, {r['fold']} side; probe reads {r['probe_site']})\n"
        f"  probe for {r['concept']}: {r['probe_before']:.3f} -> {r['probe_after']:.3f} (chance {r['chance']:.3f})\n"
        f"  probe for {r['other_concept']}: {r['other_before']} -> {r['other_after']}\n"
        f"  delta: {r['delta_path']} (a rank-{r['rank']} change of {r['module']}; split {r['split']})"))


# --- steer --------------------------------------------------------------------------------

def _steer(args: argparse.Namespace) -> None:
    from editors.steering import (
        ContrastPairs,
        Steering,
        bias_target,
        concept_axis_measure,
        dose_response,
        steering_direction,
    )

    handle = _load(args)
    bias_target(handle, args.site)
    texts, labels, _, _ = _concept_data(args, args.n)
    half = len(texts) // 2
    pairs = ContrastPairs.of([t for t, y in zip(texts[:half], labels[:half]) if y == 1],
                             [t for t, y in zip(texts[:half], labels[:half]) if y == 0])
    position: Any = int(args.position) if args.position.lstrip("-").isdigit() else args.position
    delta = Steering(args.site, strength=args.strength, position=position).fit(handle, pairs)
    measure = concept_axis_measure(handle, texts[half:], labels[half:])
    direction = steering_direction(handle, args.site, pairs, position=position)
    curve = dose_response(handle, args.site, direction, _floats(args.strengths, "--strengths"), measure)
    before = measure(handle)
    with delta.applied(handle.model):
        after = measure(handle)
    result = {"site": args.site, "strength": args.strength, "position": args.position, "param": delta.extra["param"],
              "measure": "mean projection of neutral sentences on the concept axis",
              "measure_before": round(before, 6), "measure_after": round(after, 6), "dose_response": curve.to_json(),
              "delta_path": str(delta.save(_out(args, "steer")))}
    _note_overflow(result, "measure_after")
    if args.plot:
        result["plot"] = str(curve.plot(args.plot, ylabel="projection on concept axis"))
    args.emit(args, result, lambda r: (
        f"steering at {r['site']} (bias {r['param']}), strength {r['strength']}: {r['measure_before']:.4f} -> {r['measure_after']:.4f}\n"
        f"  dose-response: " + ", ".join(f"{s:g}: {v:.4f}" for s, v in zip(r['dose_response']['strengths'], r['dose_response']['values']))
        + f" (Spearman {r['dose_response']['spearman']:.3f})\n  delta: {r['delta_path']}"))


# --- rewrite ------------------------------------------------------------------------------

def _rewrite(args: argparse.Namespace) -> None:
    import torch

    from editors.rule_rewrite import RuleRewrite, colour_pairs
    from workbench.zoo.shapesnet import clean_accuracy

    handle = _load(args)
    world = _world(handle)
    if world.config.spurious is None:
        raise WorkbenchError(f"{handle.spec}'s world has no spurious colour rule to rewrite")
    if args.n < 2:
        raise WorkbenchError(f"--n {args.n}: give at least 2 exemplar pairs")
    pairs = colour_pairs(world, args.n, seed=args.seed, mask=None if args.mask == "none" else args.mask)
    delta = RuleRewrite(layer=args.layer, rank=args.rank, directions=args.directions).fit(handle, pairs)

    def metrics() -> tuple[float, float]:
        return (clean_accuracy(handle.model, world, n=args.n_eval, generator=torch.Generator().manual_seed(args.seed + 7)),
                clean_accuracy(handle.model, world, n=args.n_eval, generator=torch.Generator().manual_seed(args.seed + 8),
                               color_mode="disagree"))

    clean_b, dis_b = metrics()
    with delta.applied(handle.model):
        clean_a, dis_a = metrics()
    result = {"layer": args.layer, "rank": delta.extra["rank"], "n_pairs": args.n, "spurious": world.config.spurious.to_json(),
              "clean_before": round(clean_b, 4), "clean_after": round(clean_a, 4),
              "disagree_before": round(dis_b, 4), "disagree_after": round(dis_a, 4),
              "relative_update": round(delta.extra["relative_update"], 4), "delta_path": str(delta.save(_out(args, "rewrite")))}
    args.emit(args, result, lambda r: (
        f"rewrote {r['layer']} (rank {r['rank']}, {r['n_pairs']} pairs)\n"
        f"  accuracy when the colour disagrees: {r['disagree_before']:.3f} -> {r['disagree_after']:.3f}\n"
        f"  clean accuracy: {r['clean_before']:.3f} -> {r['clean_after']:.3f}\n  delta: {r['delta_path']}"))


# --- parsers ------------------------------------------------------------------------------

def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], emit: Callable[..., None]) -> None:
    def base(name: str, helptext: str, func: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=helptext)
        p.add_argument("model", help="zoo:shapesnet, zoo:factgpt, minilm, a local Hugging Face folder or a hub name")
        p.add_argument("--seed", type=seed_int, default=0)
        p.add_argument("--out", default=None, help=f"where the delta is saved (default ./{name}.delta.safetensors)")
        p.add_argument("--threads", type=threads, default=None, help="torch CPU threads")
        common(p)
        p.set_defaults(func=func, emit=emit)
        return p

    def concept_args(p: argparse.ArgumentParser, n: int) -> None:
        p.add_argument("--concept", default=None, help="built-in template sentences: sentiment or topic")
        p.add_argument("--data", default=None, help='JSON file {"texts": [...], "labels": [...], "other_labels": [...]?}')
        p.add_argument("--n", type=positive_int, default=n, help="number of built-in sentences")

    p = base("units", "rank units of a site (activation difference, dissection, attribution, shapley)", _units)
    p.add_argument("--site", required=True)
    p.add_argument("--method", default="activation_difference",
                   choices=("activation_difference", "dissection", "attribution", "shapley"))
    p.add_argument("--trojan", default=None, help="ShapesNet: triggered vs clean scenes of this trojan")
    p.add_argument("--dissect-concept", default=None, help="concept mask for dissection (default: the trigger's)")
    p.add_argument("--quantile", type=finite_float, default=0.99,
                   help="dissection: activation quantile that counts as 'on' (lower it for large concepts such as textures)")
    p.add_argument("--target", type=int, default=None, help="class or token id for attribution/shapley on text")
    p.add_argument("--k", type=positive_int, default=20, help="how many units to print")
    p.add_argument("--plot", default=None, help="write the evidence PNG here")
    p.add_argument("--shapley-samples", type=positive_int, default=16)
    p.add_argument("--candidates", type=positive_int, default=16)
    p.set_defaults(concept=None, data=None)
    p.add_argument("--concept", default=None, help="text models: sentiment or topic (positive = class 1)")
    p.add_argument("--data", default=None)
    p.add_argument("--n", type=positive_int, default=128, help="inputs per set")

    p = base("ablate", "remove or scale units by a weight edit; --trojan runs ShapesNet trojan surgery", _ablate)
    p.add_argument("--trojan", default=None, help="trojan name (ShapesNet): select units, ablate, compare with random units")
    p.add_argument("--site", default=None, help="site of the units (with --trojan: restrict the search to this site)")
    p.add_argument("--units", default=None, help="comma-separated unit indices (without --trojan)")
    p.add_argument("--values", default=None, help="constant per unit replacing it (e.g. clean means); default 0")
    p.add_argument("--factor", type=finite_float, default=0.0, help="scale instead of remove (1 = unchanged)")
    p.add_argument("--side", default="auto", choices=("auto", "write", "read"))
    p.add_argument("--n-units", type=positive_int, default=None,
                   help="with --trojan: how many units (default: chosen on selection data)")
    p.add_argument("--method", default="activation_difference",
                   choices=("activation_difference", "attribution", "shapley", "dissection", "greedy", "mask"),
                   help="with --trojan: how units are selected; greedy adds units across sites one at a time, "
                        "by attack probability plus clean KL (slower: minutes); mask learns a gate per unit of every "
                        "site (Adam, --mask-steps) and keeps the units whose gates moved most (minutes)")
    p.add_argument("--mask-steps", type=positive_int, default=None,
                   help="with --method mask: optimization steps of the unit gates (the budget; default GateConfig.steps)")
    p.add_argument("--mask-max-gate", type=finite_float, default=None,
                   help="with --method mask: largest gate (1: units are only moved toward their clean mean; "
                        "default GateConfig.max_gate = 2: a unit may also be amplified up to 2x around that mean)")
    p.add_argument("--mask-mode", default="scale", choices=("scale", "hard"),
                   help="with --method mask: scale the chosen units by their learned gates (toward the clean mean, "
                        "or away from it above 1), "
                        "or mean-ablate them")
    p.add_argument("--draws", type=positive_int, default=5, help="random-unit control draws")
    p.add_argument("--n-select", type=positive_int, default=128,
                   help="with --trojan: selection scenes (triggered, with clean twins); --method mask learns on as many more")
    p.add_argument("--n-eval", type=positive_int, default=500, help="triggered scenes for attack success")
    p.add_argument("--n-clean", type=positive_int, default=1000, help="clean scenes for accuracy")
    p.add_argument("--n-ref", type=positive_int, default=None,
                   help="with --trojan: clean selection scenes (unit means, clean budget; default 3000 for --method mask, "
                        "1000 otherwise)")

    p = base("erase", "fit LEACE for a concept at a site and fold it into the weights", _erase)
    p.add_argument("--site", required=True)
    p.add_argument("--method", default="leace", choices=("leace", "orth"))
    p.add_argument("--pooling", default="mean", choices=("mean", "first", "last", "none"))
    p.add_argument("--no-affine", action="store_true", help="drop the mean-restoring constant (bias-free projections)")
    concept_args(p, 1000)
    p.set_defaults(concept="sentiment")

    p = base("steer", "add a contrastive direction to a layer's output bias; sweep the strength", _steer)
    p.add_argument("--site", required=True)
    p.add_argument("--strength", type=finite_float, default=1.0)
    p.add_argument("--strengths", default="-2,-1,-0.5,0,0.5,1,2",
                   help="dose-response sweep (write --strengths=-2,0,2 when the list starts with a minus)")
    p.add_argument("--position", default="mean", help="token position for the direction: mean, first, last or an index")
    p.add_argument("--plot", default=None, help="write the dose-response PNG here")
    concept_args(p, 400)
    p.set_defaults(concept="sentiment")

    p = base("rewrite", "rewrite a ShapesNet layer so the spurious colour no longer signals its class", _rewrite)
    p.add_argument("--layer", default="layer3.conv2", help="Conv2d or Linear layer to rewrite (default layer3.conv2)")
    p.add_argument("--rank", type=positive_int, default=32)
    p.add_argument("--directions", default="keys", choices=("difference", "keys"))
    p.add_argument("--mask", default="none", help="restrict exemplar positions to a concept mask (main) or none")
    p.add_argument("--n", type=int, default=800, help="exemplar pairs")
    p.add_argument("--n-eval", type=positive_int, default=1000, help="scenes per accuracy")
