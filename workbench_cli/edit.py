"""`workbench edit METHOD MODEL ...`: fit an edit, measure it against the unedited model, save it.

    workbench edit rome zoo:factgpt --subject "Vel Oran" --prompt "The capital of {} is" --target Quenn
    workbench edit memit zoo:factgpt --records rewrites.json --n 100 --out runs/memit --json

Single-edit methods (rome, ft, ft-l, kn) are fitted and measured one case at a time, each
with only its own delta applied; batch methods (memit) are fitted once for all cases.
Everything the user gave is checked before any fitting (subject in prompt, targets, layer,
records), so bad input exits 2 without leaving a partial delta behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

log = logging.getLogger(__name__)

EDITOR_MODULES = ("editors.rome", "editors.memit", "editors.finetune", "editors.knowledge_neuron_edit")
AUTO_TRACE_CASES = 5


def _load_editors() -> None:
    """Import the editor modules so they register (a module not written yet is skipped)."""
    for name in EDITOR_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


def _parse_layer(value: str | None, n_layers: int) -> int | str | None:
    if value is None or value == "auto":
        return value
    try:
        layer = int(value)
    except ValueError:
        raise WorkbenchError(f"--layer {value!r}: expected an integer 0..{n_layers - 1} or 'auto'") from None
    if not 0 <= layer < n_layers:
        raise WorkbenchError(f"--layer {layer} is out of range: the model has {n_layers} layers, choose 0..{n_layers - 1}")
    return layer


def _single_rewrite(handle: Any, args: argparse.Namespace) -> Any:
    from workbench.requests import Rewrite, subject_token_span, target_token_ids
    from workbench.tokens import encode_prompt

    prompt, subject = args.prompt, args.subject
    if not subject or not subject.strip():
        raise WorkbenchError("--subject is empty; give the entity whose fact is rewritten")
    if "{}" not in prompt:
        if subject not in prompt:
            subject_token_span(handle.tokenizer, prompt, subject)  # raises, listing the prompt's tokens
        prompt = prompt.replace(subject, "{}", 1)
    subject_token_span(handle.tokenizer, prompt, subject)
    target_token_ids(handle.tokenizer, args.target)
    target_true = args.target_true
    if target_true is None:
        import torch

        ids = encode_prompt(handle.tokenizer, prompt.format(subject))
        with torch.no_grad():
            logits = handle.model(input_ids=torch.tensor([ids], device=handle.device)).logits[0, -1]
        target_true = handle.tokenizer.decode([int(logits.argmax())]).strip() or None
    return Rewrite(prompt=prompt, subject=subject, target_new=args.target.strip(), target_true=target_true,
                   case_id="0")


def _rewrites(handle: Any, args: argparse.Namespace) -> list[Any]:
    from workbench.requests import Rewrite
    from workbench.worlds.factworld import load_counterfact

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
                rewrites.append(Rewrite.from_counterfact(record))
            except WorkbenchError as exc:
                raise WorkbenchError(f"{args.records}: record {i} (case_id {record.get('case_id')}): {exc}") from None
        return rewrites
    if not all(single):
        missing = [flag for flag, given in zip(("--subject", "--prompt", "--target"), single) if not given]
        raise WorkbenchError(f"missing {', '.join(missing)}: give --subject, --prompt and --target, or --records FILE")
    return [_single_rewrite(handle, args)]


def _validate(handle: Any, rewrites: Sequence[Any], source: str) -> None:
    from editors.mlp_update import validate_rewrite

    for i, rw in enumerate(rewrites):
        try:
            validate_rewrite(handle, rw)
        except WorkbenchError as exc:
            raise WorkbenchError(f"{source} case {rw.case_id if rw.case_id is not None else i}: {exc}") from None


def _auto_layer(handle: Any, rewrites: Sequence[Any]) -> tuple[int, bool, list[dict[str, Any]]]:
    """The most common MLP peak layer of causal traces of the first cases; also whether the peak is
    at the prompt's last token (then editors look the fact up there)."""
    from workbench.causal_trace import causal_trace

    found = []
    for rw in rewrites[:AUTO_TRACE_CASES]:
        trace = causal_trace(handle, rw.text, rw.subject)
        peak = trace.peak("mlp")
        found.append({"case_id": rw.case_id, "layer": int(peak.layer), "token": int(peak.token),
                      "token_text": getattr(peak, "token_text", None), "effect": float(peak.effect),
                      "last_token": int(peak.token) == len(trace.tokens) - 1})
    layer = Counter(f["layer"] for f in found).most_common(1)[0][0]
    last = sum(f["last_token"] for f in found) * 2 > len(found)
    return layer, last, found


def model_editor_defaults(handle: Any, method: str, cls: type) -> dict[str, Any]:
    """The options a model ships for `method` (handle.info["editor_defaults"]), limited to the editor's fields."""
    info = getattr(handle, "info", None)
    shipped = (info.get("editor_defaults") or {}).get(method, {}) if isinstance(info, dict) else {}
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    return {k: v for k, v in shipped.items() if k in fields}


def _editor(cls: type, handle: Any, layer: int | None, last_token: bool, fact_token: str | None,
            mom2_samples: int | None = None, *, method: str = "", settings: list[str] | None = None) -> Any:
    from workbench_cli.settings import parse_settings

    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    kwargs: dict[str, Any] = {**model_editor_defaults(handle, method, cls), **parse_settings(cls, settings)}
    if mom2_samples is not None:
        if "mom2_n_samples" not in fields:
            raise WorkbenchError(f"--mom2-samples does not apply to {cls.__name__} (it uses no key statistics)")
        if mom2_samples < 1:
            raise WorkbenchError(f"--mom2-samples {mom2_samples}: expected a positive number of tokens")
        kwargs["mom2_n_samples"] = mom2_samples
    if fact_token is None and last_token:
        fact_token = "prompt_last"
    if fact_token is not None:
        if "fact_token" not in fields:
            raise WorkbenchError(f"--fact-token does not apply to {cls.__name__}")
        kwargs["fact_token"] = fact_token
    if layer is not None:
        if "layer" in fields:
            kwargs["layer"] = layer
        elif "layers" in fields and hasattr(cls, "ending_at"):
            return cls.ending_at(layer, handle.arch.n_layers, **kwargs)
        elif "layers" in fields:
            kwargs["layers"] = (layer,)
        else:
            raise WorkbenchError(f"--layer does not apply to {cls.__name__} (it has no layer option)")
    return cls(**kwargs)


def _save_model(handle: Any, delta: Any, out: Path) -> Path:
    """Write the edited model (safetensors) and tokenizer to `out`, atomically (temp folder, rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with delta.applied(handle.model):
            handle.model.save_pretrained(tmp, safe_serialization=True)
        handle.tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _short(extra: dict[str, Any]) -> dict[str, Any]:
    keep = ("layer", "layers", "denominator", "relative_denominator", "update_norm", "update_ratio", "clamped",
            "nll_before", "nll_after", "nll_before_mean", "nll_after_mean", "timings", "per_layer")
    return {k: extra[k] for k in keep if k in extra}


def _edit(args: argparse.Namespace) -> None:
    from editors.registry import get
    from workbench.counterfact import aggregate_cases, bootstrap_intervals, evaluate_rewrites
    from workbench.models import load
    from workbench.results import RunStore

    _load_editors()
    cls = get(args.method)
    batch = bool(getattr(cls, "BATCH", False))
    from workbench_cli.settings import parse_settings

    parse_settings(cls, args.set)  # refuse a bad --set before loading (or training) the model
    handle = load(args.model, device=args.device, progress=False)
    from workbench.sites import require_causal_lm

    require_causal_lm(handle, args.method, weight_role="mlp_out")
    layer = _parse_layer(args.layer, handle.arch.n_layers)
    rewrites = _rewrites(handle, args)
    _validate(handle, rewrites, args.records or "request")
    if args.save_model and not batch and len(rewrites) > 1:
        raise WorkbenchError(f"--save-model with {args.method} needs one case (each case is its own edit of the "
                             f"original model); got {len(rewrites)}. Use --n 1, or a batch method such as memit")
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise WorkbenchError(f"--out {args.out} exists and is not a folder")
    traced: list[dict[str, Any]] = []
    last_token = False
    if layer == "auto":
        layer, last_token, traced = _auto_layer(handle, rewrites)
    editor = _editor(cls, handle, layer, last_token, args.fact_token, args.mom2_samples, method=args.method,
                     settings=args.set)
    for i, rw in enumerate(rewrites):
        if rw.case_id is None:
            rewrites[i] = dataclasses.replace(rw, case_id=str(i))

    eval_kw = {"batch_size": args.batch_size, "fluency": not args.no_fluency, "seed": args.seed}
    unedited = evaluate_rewrites(handle, rewrites, bootstrap=0, **eval_kw)
    store = RunStore(args.out) if args.out else None
    config = {"method": args.method, "model": args.model, "n_cases": len(rewrites), "layer": layer,
              "editor": _jsonable_config(editor), "records": args.records, "seed": args.seed}
    if store is not None:
        store.write_config(config)

    per_case: list[dict[str, Any]] = []
    deltas: list[str] = []
    norms: dict[str, Any] = {}
    details: dict[str, Any] = {}
    start = time.perf_counter()
    saved_model = None
    if batch:
        delta = editor.fit(handle, rewrites)
        with delta.applied(handle.model):
            edited = evaluate_rewrites(handle, rewrites, bootstrap=0, **eval_kw)
        per_case = edited.per_case
        norms = delta.norms()
        details = _short(delta.extra)
        if store is not None:
            path = store.artifact_path("delta.safetensors")
            delta.save(path)
            deltas.append(str(path))
            for rw, before, after in zip(rewrites, unedited.per_case, per_case):
                store.write_case(str(rw.case_id), {"rewrite": rw.to_json(), "unedited": before, "edited": after})
        if args.save_model:
            saved_model = str(_save_model(handle, delta, Path(args.save_model)))
    else:
        for rw, before in zip(rewrites, unedited.per_case):
            delta = editor.fit(handle, rw)
            with delta.applied(handle.model):
                after = evaluate_rewrites(handle, [rw], bootstrap=0, **eval_kw).per_case[0]
            per_case.append(after)
            norms[str(rw.case_id)] = delta.norms()
            details[str(rw.case_id)] = _short(delta.extra)
            record = {"rewrite": rw.to_json(), "unedited": before, "edited": after, "update_norms": delta.norms(),
                      "details": _short(delta.extra)}
            if store is not None:
                name = "delta.safetensors" if len(rewrites) == 1 else f"deltas/{_safe(str(rw.case_id))}.safetensors"
                path = store.artifact_path(name)
                delta.save(path)
                deltas.append(str(path))
                record["delta"] = str(path)
                store.write_case(str(rw.case_id), record)
            if args.save_model:
                saved_model = str(_save_model(handle, delta, Path(args.save_model)))
    seconds = time.perf_counter() - start
    metrics = aggregate_cases(per_case)
    result = {
        "method": args.method,
        "model": args.model,
        "n_cases": len(rewrites),
        "layer": layer,
        "traced_layers": traced,
        "editor": _jsonable_config(editor),
        "metrics": metrics,
        "intervals": {k: list(v) for k, v in bootstrap_intervals(per_case, seed=args.seed).items()},
        "unedited": unedited.aggregate,
        "delta": (deltas[0] if len(deltas) == 1 else deltas) if deltas else None,
        "update_norms": norms,
        "details": details,
        "edit_seconds": round(seconds, 3),
        "saved_model": saved_model,
        "hint": _hint(editor, metrics, bool(traced), details),
    }
    if store is not None:
        store.write_summary(result)
    args.emit(args, result, _text)


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
                "neighbours); editors.memit.key_write_shares measures both before editing (on FactGPT: "
                "benchmarks/memit_key_geometry.py)")
    return None


def _safe(name: str) -> str:
    from workbench.results import encode_case_id

    return encode_case_id(name)


def _jsonable_config(editor: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(editor):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(editor).items()}
    return {"repr": repr(editor)}


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def _edited_layers(r: dict[str, Any]) -> Any:
    """The layer(s) an edit without --layer changed: set with --set, or the editor's default as recorded."""
    editor = r.get("editor") or {}
    configured = editor.get("layer", editor.get("layers"))
    if configured is not None:
        return configured
    details = r.get("details") or {}
    recorded = [details] if "layer" in details or "layers" in details else list(details.values())
    found = sorted({x for d in recorded if isinstance(d, dict)
                    for x in (d.get("layers") or ([d["layer"]] if d.get("layer") is not None else []))})
    return (found[0] if len(found) == 1 else found) if found else "the editor's default"


def _text(r: dict[str, Any]) -> str:
    keys = ("ES", "PS", "NS", "S", "EA", "PA", "NA", "GE")
    where = r["layer"] if r["layer"] is not None else _edited_layers(r)
    lines = [f"{r['method']} on {r['model']}: {r['n_cases']} case(s), layer {where}, {r['edit_seconds']} s"]
    lines.append(f"{'':10}" + "".join(f"{k:>8}" for k in keys))
    lines.append(f"{'unedited':10}" + "".join(f"{_fmt(r['unedited'].get(k)):>8}" for k in keys))
    lines.append(f"{'edited':10}" + "".join(f"{_fmt(r['metrics'].get(k)):>8}" for k in keys))
    if r.get("delta"):
        lines.append(f"delta: {r['delta'] if isinstance(r['delta'], str) else str(len(r['delta'])) + ' files'}")
    if r.get("saved_model"):
        lines.append(f"edited model: {r['saved_model']}")
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
    p.add_argument("--n", type=int, default=None, help="use the first N records")
    p.add_argument("--layer", default=None,
                   help="layer to edit, or 'auto' (the MLP peak of a causal trace); default: the editor's")
    p.add_argument("--fact-token", default=None, choices=("subject_last", "prompt_last"),
                   help="where rome/memit read the key (default: subject_last; 'auto' layers may pick prompt_last)")
    p.add_argument("--mom2-samples", type=int, default=None,
                   help="tokens of corpus statistics for rome/memit (default: the editor's, 100000)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="editor option (repeatable), e.g. --set n_prefixes=10; zoo models ship measured defaults")
    p.add_argument("--out", default=None, help="run folder: delta(s), per-case results, summary.json")
    p.add_argument("--save-model", default=None, help="write the edited model here (save_pretrained + tokenizer)")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per forward pass when measuring")
    p.add_argument("--no-fluency", action="store_true", help="skip the generation-fluency measure (faster)")
    p.add_argument("--seed", type=int, default=0, help="seed of fluency sampling and bootstrap intervals")
    common(p)
    p.set_defaults(func=_edit, emit=emit)
