"""`workbench edit METHOD MODEL ...`: fit an edit, measure it against the unedited model, save it.

    workbench edit rome zoo:factgpt --subject "Vel Oran" --prompt "The capital of {} is" --target Quenn
    workbench edit memit zoo:factgpt --records rewrites.json --n 100 --out runs/memit --json

Single-edit methods (rome, ft, ft-l, kn) are fitted and measured one case at a time, each
with only its own delta applied; batch methods (memit) are fitted once for all cases. The
edit goes through the editing protocol (`workbench_protocols.editing`), as in the studies.
Everything the user gave is checked before any fitting (subject in prompt, targets, layer,
records, output folders), and outputs are written only when everything succeeded, so bad
input exits 2 and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench_cli.checks import new_folder, positive_int, seed_int


def _parse_layer(value: str | None, n_layers: int) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        layer = int(value)
    except ValueError:
        raise WorkbenchError(f"--layer {value!r}: expected an integer 0..{n_layers - 1} or 'auto'") from None
    if not 0 <= layer < n_layers:
        raise WorkbenchError(f"--layer {layer} is out of range: the model has {n_layers} layers, "
                             f"choose 0..{n_layers - 1}")
    return layer


def _rewrites(handle: Any, args: argparse.Namespace) -> list[Any]:
    from workbench.requests import Rewrite
    from workbench.worlds.factworld import load_counterfact
    from workbench_protocols.editing import request_rewrite

    single = [args.subject is not None, args.prompt is not None, args.target is not None]
    if args.records is not None:
        if any(single):
            raise WorkbenchError("give either --records FILE or --subject/--prompt/--target, not both")
        records = load_counterfact(args.records)
        if args.n is not None:
            if args.n < 1:
                raise WorkbenchError(f"--n {args.n}: expected a positive number of records")
            records = records[: args.n]
        if not records:
            raise WorkbenchError(f"{args.records} holds no records")
        rewrites = []
        for i, record in enumerate(records):
            try:
                rw = Rewrite.from_counterfact(record)
            except WorkbenchError as exc:
                raise WorkbenchError(f"{args.records}: record {i} (case_id {record.get('case_id')}): {exc}") from None
            rewrites.append(rw if rw.case_id is not None else dataclasses.replace(rw, case_id=str(i)))
        return rewrites
    if not all(single):
        missing = [flag for flag, given in zip(("--subject", "--prompt", "--target"), single) if not given]
        raise WorkbenchError(f"missing {', '.join(missing)}: give --subject, --prompt and --target, or --records FILE")
    return [request_rewrite(handle, prompt=args.prompt, subject=args.subject, target=args.target,
                            target_true=args.target_true)]


def _overrides(cls: type, args: argparse.Namespace, site: Any) -> dict[str, Any]:
    """Editor options the user set: `--set`, `--mom2-samples`, and `--fact-token` where no site carries it."""
    from workbench_cli.settings import parse_settings

    names = {f.name for f in dataclasses.fields(cls)}
    out = parse_settings(cls, args.set)
    if args.mom2_samples is not None:
        if "mom2_n_samples" not in names:
            raise WorkbenchError(f"--mom2-samples does not apply to {cls.__name__} (it uses no key statistics)")
        if args.mom2_samples < 1:
            raise WorkbenchError(f"--mom2-samples {args.mom2_samples}: expected a positive number of tokens")
        out["mom2_n_samples"] = args.mom2_samples
    if args.fact_token is not None:
        if "fact_token" not in names:
            raise WorkbenchError(f"--fact-token does not apply to {cls.__name__}")
        if site is None:
            out["fact_token"] = args.fact_token
    return out


def _layer_source(site: Any, handle: Any, method: str) -> str:
    from workbench_protocols.editing import shipped_options

    if site is None:
        shipped = {"layer", "layers"} & set(shipped_options(handle, method))
        return f"the layer {handle.spec} ships for {method}, as measured" if shipped else "the editor's default"
    return {"given": "--layer", "traced": "traced: the MLP peak of causal traces of the first cases"}[site.source]


def _edit(args: argparse.Namespace) -> None:
    import editors
    from workbench.counterfact import aggregate_cases, bootstrap_intervals
    from workbench.models import load
    from workbench.results import RunStore, encode_case_id
    from workbench.sites import require_causal_lm
    from workbench.storage import fill_new_folder
    from workbench_protocols.editing import (
        choose_edit_site,
        edit_batch,
        edit_each,
        editor_at,
        score_rewrites,
        validate_rewrites,
    )

    cls = editors.get(args.method)
    batch = bool(getattr(cls, "BATCH", False))
    cls(**_overrides(cls, args, None))  # refuse a bad --set (its config's own checks too) before loading the model
    out = new_folder(args.out, "--out")
    save_model = new_folder(args.save_model, "--save-model")
    if out is not None and save_model is not None and out.absolute() == save_model.absolute():
        raise WorkbenchError(f"--out and --save-model are both {out}; give two different new folders")
    handle = load(args.model, device=args.device, progress=False)
    require_causal_lm(handle, args.method, weight_role="mlp_out")
    layer = _parse_layer(args.layer, handle.arch.n_layers)
    rewrites = _rewrites(handle, args)
    validate_rewrites(handle, rewrites, source=args.records or "request")
    if save_model is not None and not batch and len(rewrites) > 1:
        raise WorkbenchError(f"--save-model with {args.method} needs one case (each case is its own edit of the "
                             f"original model); got {len(rewrites)}. Use --n 1, or a batch method such as memit")
    site = choose_edit_site(handle, args.method, rewrites, layer=layer, fact_token=args.fact_token)
    editor = editor_at(args.method, handle, site, **_overrides(cls, args, site))

    eval_kw = {"batch_size": args.batch_size, "fluency": not args.no_fluency, "seed": args.seed}
    unedited = score_rewrites(handle, rewrites, **eval_kw)
    start = time.perf_counter()
    if batch:
        outcomes, _ = edit_batch(handle, editor, rewrites, keep_delta=True, **eval_kw)
    else:
        outcomes = edit_each(handle, editor, rewrites, keep_deltas=True, **eval_kw)
    seconds = time.perf_counter() - start
    refused = [o for o in outcomes if o.refusal is not None]
    if len(refused) == len(outcomes):
        raise WorkbenchError(f"{args.method} refused every edit: {refused[0].refusal}")
    per_case = [o.scores for o in outcomes]
    deltas = [o.delta for o in outcomes if o.delta is not None]
    if batch:
        norms: dict[str, Any] = deltas[0].norms()
        details: dict[str, Any] = _short(deltas[0].extra)
    else:
        norms = {str(o.rewrite.case_id): o.delta.norms() for o in outcomes if o.delta is not None}
        details = {str(o.rewrite.case_id): _short(o.delta.extra) for o in outcomes if o.delta is not None}
    metrics = aggregate_cases(per_case)
    one_delta = len({id(d) for d in deltas}) == 1
    names = {o.rewrite.case_id: ("delta.safetensors" if one_delta else
                                 f"deltas/{encode_case_id(str(o.rewrite.case_id))}.safetensors")
             for o in outcomes if o.delta is not None}
    result = {
        "method": args.method,
        "model": args.model,
        "n_cases": len(rewrites),
        "layer": _edited_layers(editor, deltas),
        "layer_source": _layer_source(site, handle, args.method),
        "traced_layers": list(site.traced) if site is not None else [],
        "editor": _jsonable_config(editor),
        "metrics": metrics,
        "intervals": {k: list(v) for k, v in bootstrap_intervals(per_case, seed=args.seed).items()},
        "unedited": aggregate_cases(unedited),
        "delta": None,
        "update_norms": norms,
        "details": details,
        "refused": [{"case_id": o.rewrite.case_id, "reason": o.refusal} for o in refused],
        "edit_seconds": round(seconds, 3),
        "saved_model": None,
        "hint": _hint(editor, metrics, site is not None and site.source == "traced", details),
    }
    if out is not None:
        paths = sorted(str(out / n) for n in set(names.values()))
        result["delta"] = paths[0] if len(paths) == 1 else paths

        def fill(tmp: Path) -> None:
            store = RunStore(tmp)
            store.write_config({"method": args.method, "model": args.model, "n_cases": len(rewrites),
                                "layer": result["layer"], "editor": result["editor"], "records": args.records,
                                "seed": args.seed})
            saved: set[str] = set()
            for o, before in zip(outcomes, unedited):
                record = {"rewrite": o.rewrite.to_json(), "unedited": before, "edited": o.scores}
                if o.refusal is not None:
                    record["refusal"] = o.refusal
                if o.delta is not None:
                    name = names[o.rewrite.case_id]
                    if name not in saved:
                        o.delta.save(store.artifact_path(name))
                        saved.add(name)
                    if not batch:
                        record.update({"delta": str(out / name), "update_norms": o.delta.norms(),
                                       "details": _short(o.delta.extra)})
                store.write_case(str(o.rewrite.case_id), record)
            store.write_summary(result)

        fill_new_folder(out, fill)
    if save_model is not None:
        result["saved_model"] = str(_save_model(handle, deltas[0], save_model))
    args.emit(args, result, _text)


def _save_model(handle: Any, delta: Any, out: Path) -> Path:
    """Write the edited model (safetensors), its tokenizer, shipped options and world to the new folder `out`, atomically."""
    from workbench.models import EDITOR_DEFAULTS_FILE, transformers_progress_bars
    from workbench.storage import atomic_write_json, fill_new_folder
    from workbench.zoo import WORLD

    def fill(tmp: Path) -> None:
        with delta.applied(handle.model), transformers_progress_bars(False):
            handle.model.save_pretrained(tmp, safe_serialization=True)
        handle.tokenizer.save_pretrained(tmp)
        shipped = handle.info.get("editor_defaults")
        if shipped:
            atomic_write_json(tmp / EDITOR_DEFAULTS_FILE, shipped)
        if hasattr(handle.world, "save"):
            handle.world.save(tmp / WORLD)

    fill_new_folder(out, fill)
    return out


def _short(extra: dict[str, Any]) -> dict[str, Any]:
    keep = ("layer", "layers", "denominator", "relative_denominator", "update_norm", "update_ratio", "clamped",
            "nll_before", "nll_after", "nll_before_mean", "nll_after_mean", "timings", "per_layer")
    return {k: extra[k] for k in keep if k in extra}


def _edited_layers(editor: Any, deltas: Sequence[Any]) -> Any:
    """The layer(s) the edit changed: as configured, else as the fitted deltas recorded them."""
    configured = getattr(editor, "layer", None)
    configured = getattr(editor, "layers", None) if configured is None else configured
    if configured is not None:
        return list(configured) if isinstance(configured, tuple) else configured
    found = sorted({x for d in deltas for x in (d.extra.get("layers") or
                                                 ([d.extra["layer"]] if d.extra.get("layer") is not None else []))})
    return (found[0] if len(found) == 1 else found) if found else None


SELF_SHARE_HINT = 0.8  # below this mean share of its own residual, a batch edit cannot land fully


def _hint(editor: Any, metrics: dict[str, Any], traced: bool, details: dict[str, Any] | None = None) -> str | None:
    """What to try when the edit did not take: where the key was read is the likely reason;
    for a batch edit that took only partly, that the edits' keys crowd each other."""
    es = metrics.get("ES")
    if es is None:
        return None
    if es <= 50 and not traced and hasattr(editor, "fact_token"):  # no better than a coin: likely the wrong place
        where = getattr(editor, "layer", None)
        where = getattr(editor, "layers", None) if where is None else where
        return (f"the edit did not take (ES {es:.1f}): {type(editor).__name__} edited layer(s) {where} with its key at "
                f"the {editor.fact_token.replace('_', ' ')} token; the fact may be stored elsewhere (see `workbench "
                "trace`): try --layer auto, which traces first and edits where the trace peaks")
    shares = [p["self_share"] for p in (details or {}).get("per_layer", []) if "self_share" in p]
    if es < 99 and shares and min(shares) < SELF_SHARE_HINT:
        return (f"each edit's key received on average {100 * min(shares):.0f}% of its own update (ES {es:.1f}): the "
                "edited keys resemble each other or lambda is large, and what misses them lands on similar subjects. "
                "Try fewer edits per batch, or a smaller mom2_update_weight (more efficacy, more damage to "
                "neighbours); editors.memit.key_write_shares measures both before editing")
    return None


def _jsonable_config(editor: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(editor):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(editor).items()}
    return {"repr": repr(editor)}


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def _text(r: dict[str, Any]) -> str:
    keys = ("ES", "PS", "NS", "S", "EA", "PA", "NA", "GE")
    where = r["layer"] if r["layer"] is not None else "the editor's default"
    lines = [f"{r['method']} on {r['model']}: {r['n_cases']} case(s), layer {where} ({r['layer_source']}), "
             f"{r['edit_seconds']} s"]
    lines.append(f"{'':10}" + "".join(f"{k:>8}" for k in keys))
    lines.append(f"{'unedited':10}" + "".join(f"{_fmt(r['unedited'].get(k)):>8}" for k in keys))
    lines.append(f"{'edited':10}" + "".join(f"{_fmt(r['metrics'].get(k)):>8}" for k in keys))
    if r.get("delta"):
        lines.append(f"delta: {r['delta'] if isinstance(r['delta'], str) else str(len(r['delta'])) + ' files'}")
    if r.get("saved_model"):
        lines.append(f"edited model: {r['saved_model']}")
    if r.get("refused"):
        first = r["refused"][0]
        lines.append(f"refused: {len(r['refused'])} of {r['n_cases']} case(s), e.g. case {first['case_id']}: "
                     f"{first['reason']}")
    if r.get("hint"):
        lines.append(f"hint: {r['hint']}")
    return "\n".join(lines)


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], emit: Callable[..., None]) -> None:
    p = sub.add_parser("edit", help="rewrite facts with an editor (rome, memit, ft, ft-l, kn) and measure the edit")
    p.add_argument("method", help="editor name (rome, memit, ft, ft-l, kn)")
    p.add_argument("model", help="zoo:factgpt, a local Hugging Face folder or a hub name")
    p.add_argument("--subject", default=None, help="the subject whose fact is rewritten")
    p.add_argument("--prompt", default=None, help="prompt with {} for the subject (or containing the subject)")
    p.add_argument("--target", default=None, help="the new answer")
    p.add_argument("--target-true", default=None, help="the current answer (default: the model's top-1 token)")
    p.add_argument("--records", default=None, help="CounterFact-format JSON file of rewrites")
    p.add_argument("--n", type=positive_int, default=None, help="use the first N records")
    p.add_argument("--layer", default=None,
                   help="layer to edit, or 'auto' (the MLP peak of a causal trace); default: the editor's")
    p.add_argument("--fact-token", default=None, choices=("subject_last", "prompt_last"),
                   help="where rome/memit read the key (default: subject_last; 'auto' layers may pick prompt_last)")
    p.add_argument("--mom2-samples", type=positive_int, default=None,
                   help="tokens of corpus statistics for rome/memit (default: the editor's, 100000)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="editor option (repeatable), e.g. --set n_prefixes=10; zoo models ship measured defaults")
    p.add_argument("--out", default=None, help="run folder: delta(s), per-case results, summary.json")
    p.add_argument("--save-model", default=None, help="write the edited model here (save_pretrained + tokenizer)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="prompts per forward pass when measuring")
    p.add_argument("--no-fluency", action="store_true", help="skip the generation-fluency measure (faster)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of fluency sampling and bootstrap intervals")
    common(p)
    p.set_defaults(func=_edit, emit=emit)
