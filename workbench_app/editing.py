"""The knowledge-editing loop of the app: answers, trace, frozen prediction, edit, measurement, verdict.

Everything a user types is checked here, before a job starts, with the core's own checks
(so the page shows the CLI's one-line messages). The edit itself goes through the editing
protocol (`workbench_protocols.editing.editor_at`), as `workbench edit` does.

A prediction says which prompts should change (the prompt and its paraphrases: P(target_new)
should beat P(target_true)) and which should not (neighbouring subjects: the true answer
should keep beating the new one), and by how much. It is frozen (hashed, written to the job's
folder) before the edit runs. The verdict compares each expectation with the measurement:
`held` when all hold, `failed` when any fails, `inconclusive` when they hold but already held
on the unedited model (then the edit is not what made them true).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from workbench.errors import WorkbenchError
from workbench.requests import Rewrite, subject_token_span, target_token_ids
from workbench.storage import sha256_json
from workbench.tokens import check_fits, encode_prompt
from workbench_app.jobs import JobContext
from workbench_app.workspace import OpenModel

METHODS = ("rome", "memit", "ft", "ft-l", "kn")
FACT_TOKENS = ("subject_last", "prompt_last")
KINDS = ("hidden", "mlp", "attn")
MAX_PROMPTS = 40
MAX_TEXT = 400
DEFAULT_EXPECT = {"prompt_p_new_min": 0.5, "change_share_min": 0.5, "keep_share_min": 0.8}
N_NEIGHBOURS = 5


# --- input checks ------------------------------------------------------------------------

def text_field(value: Any, name: str, *, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value.strip()):
        raise WorkbenchError(f"the {name} is empty; give it as text")
    if len(value) > MAX_TEXT:
        raise WorkbenchError(f"the {name} is {len(value)} characters; the limit is {MAX_TEXT}")
    return value


def check_prompt(value: Any) -> str:
    """A prompt: text, with at most one `{}` (where the subject goes) and no other braces."""
    prompt = text_field(value, "prompt")
    assert prompt is not None
    if prompt.replace("{}", "", 1).count("{") or prompt.replace("{}", "", 1).count("}"):
        raise WorkbenchError(f"prompt {prompt!r} has braces other than one '{{}}' where the subject goes; write it "
                             "like 'The capital of {} is', or give the full text")
    return prompt


def prompt_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise WorkbenchError(f"{name} must be a list of prompts (strings)")
    prompts = [p.strip() for p in value if p.strip()]
    if len(prompts) > MAX_PROMPTS:
        raise WorkbenchError(f"{name} has {len(prompts)} prompts; the limit is {MAX_PROMPTS}")
    for p in prompts:
        text_field(p, f"prompt in {name}")
    return prompts


def check_layer(layer: Any, n_layers: int) -> int:
    """The layer as an int in range; the message is the CLI's `--layer` one, without the dashes."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise WorkbenchError(f"layer {layer!r}: expected an integer 0..{n_layers - 1}")
    if not 0 <= layer < n_layers:
        raise WorkbenchError(f"layer {layer} is out of range: the model has {n_layers} layers, choose 0..{n_layers - 1}")
    return layer


def int_in(value: Any, name: str, lo: int, hi: int, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise WorkbenchError(f"{name} {value!r}: expected an integer {lo}..{hi}")
    return value


def share(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 1:
        raise WorkbenchError(f"{name} {value!r}: expected a number between 0 and 1")
    return float(value)


def require_fact_model(model: OpenModel) -> Any:
    h = model.ensure_loaded()
    if h.kind != "causal_lm" or h.tokenizer is None:
        raise WorkbenchError(f"{model.spec} is a {h.kind}; knowledge editing needs a causal language model with a "
                             "tokenizer (e.g. zoo:factgpt)")
    return h


def full_rewrite(h: Any, prompt: str, subject: str, target: str, target_true: str | None) -> Rewrite:
    """The request as a Rewrite, checked by the protocol (subject in prompt, targets tokenize, fits)."""
    from workbench_protocols.editing import request_rewrite, validate_rewrites

    check_prompt(prompt)
    text_field(subject, "subject")
    if not isinstance(target, str):
        raise WorkbenchError(f"target {target!r} is empty; give the answer word, e.g. 'Paris'")
    text_field(target_true, "true target", required=False)
    rw = request_rewrite(h, prompt=prompt, subject=subject, target=target,
                         target_true=target_true.strip() if isinstance(target_true, str) and target_true.strip() else None)
    if not rw.target_true:
        raise WorkbenchError("the model's top answer is empty text; give the true target explicitly")
    if rw.target_true.strip() == rw.target_new.strip():
        raise WorkbenchError(f"the target {rw.target_new!r} is already the model's answer; give a different new answer")
    validate_rewrites(h, [rw])
    return rw


# --- answers and suggested prompts ---------------------------------------------------------

def top_answers(h: Any, text: str, k: int = 10) -> list[dict[str, Any]]:
    """The model's k most likely next tokens after `text`, with probabilities."""
    import torch

    ids = encode_prompt(h.tokenizer, text)
    check_fits(h.model, len(ids) + 1, "the prompt")
    with torch.no_grad():
        logits = h.model(input_ids=torch.tensor([ids], device=h.device)).logits[0, -1].float()
    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(probs, min(k, probs.shape[0]))
    return [{"token": h.tokenizer.decode([int(i)]), "id": int(i), "p": float(p)} for p, i in zip(top.values, top.indices)]


def suggested_prompts(h: Any, rw: Rewrite, *, seed: int = 0) -> dict[str, Any]:
    """Paraphrases (the relation's other templates) and neighbours (subjects sharing the true answer) from the
    model's FactWorld, as CounterFact builds them; empty for a model without a world."""
    world = h.world
    relations = getattr(world, "relations", None)
    if not relations:
        return {"relation": None, "paraphrases": [], "neighbours": [], "world_truth": None}
    from workbench.worlds.factworld import filler_sentence

    rel = next((r for r in relations if rw.prompt in r.templates), None)
    if rel is None:
        return {"relation": None, "paraphrases": [], "neighbours": [], "world_truth": None}
    rng = random.Random(seed)
    truth = None
    try:
        truth = world.object_of(rw.subject, rel.relation_id)
    except WorkbenchError:
        pass
    paraphrases = [f"{filler_sentence(rng)} {t.format(rw.subject)}" for t in rel.templates if t != rw.prompt]
    answer = truth or rw.target_true
    others = [s for s in world.subjects_with(rel.relation_id, answer) if s != rw.subject] if answer else []
    picked = rng.sample(others, min(N_NEIGHBOURS, len(others)))
    neighbours = [rng.choice(rel.templates).format(s) for s in picked]
    return {"relation": rel.relation_id, "relation_name": rel.name, "paraphrases": paraphrases,
            "neighbours": neighbours, "world_truth": truth}


def example(model: OpenModel, seed: int) -> dict[str, Any]:
    """One fact of the model's FactWorld as a rewrite request (what the page's "Example fact" fills in)."""
    with model.compute():
        h = require_fact_model(model)
        world = h.world
        if world is None or not hasattr(world, "counterfact_records"):
            raise WorkbenchError(f"{model.spec} has no FactWorld to draw an example from; type a prompt and subject")
        rec = world.counterfact_records(1, seed=seed)[0]["requested_rewrite"]
        return {"prompt": rec["prompt"], "subject": rec["subject"], "target": rec["target_new"]["str"],
                "target_true": rec["target_true"]["str"], "seed": seed}


def answers(model: OpenModel, body: Mapping[str, Any]) -> dict[str, Any]:
    """Top answers for the prompt; with a subject (and target), the checked request and suggested prompts."""
    with model.compute():
        h = require_fact_model(model)
        prompt = check_prompt(body.get("prompt"))
        subject = text_field(body.get("subject"), "subject", required=False)
        k = int_in(body.get("k"), "k", 1, 50, 10)
        text = prompt.replace("{}", subject) if subject is not None else prompt
        if "{}" in text:
            raise WorkbenchError(f"prompt {prompt!r} has '{{}}' for the subject; give the subject too")
        out: dict[str, Any] = {"text": text, "answers": top_answers(h, text, k)}
        if subject is not None:
            span = subject_token_span(h.tokenizer, prompt, subject)
            enc = h.tokenizer(text, add_special_tokens=False)["input_ids"]
            out["tokens"] = [h.tokenizer.decode([i]) for i in enc]
            out["subject_span"] = list(span)
            target = body.get("target")
            if target is not None:
                rw = full_rewrite(h, prompt, subject, target, body.get("target_true"))
                out["rewrite"] = rw.to_json()
                out["suggested"] = suggested_prompts(h, rw)
        return out


# --- trace ----------------------------------------------------------------------------------

def trace_request(model: OpenModel, body: Mapping[str, Any]) -> dict[str, Any]:
    """The checked trace options (before any job starts)."""
    from workbench.tracing.engine import check_kinds

    with model.compute():
        h = require_fact_model(model)
        prompt = check_prompt(body.get("prompt"))
        subject = text_field(body.get("subject"), "subject")
        subject_token_span(h.tokenizer, prompt, subject)
        target = body.get("target_true")
        if target is not None:
            target_token_ids(h.tokenizer, target)
        kinds = check_kinds(body.get("kinds") or KINDS)
        return {"prompt": prompt, "subject": subject, "target_true": target, "kinds": list(kinds),
                "window": int_in(body.get("window"), "window", 1, 64, 10),
                "samples": int_in(body.get("samples"), "samples", 1, 64, 10),
                "seed": int_in(body.get("seed"), "seed", 0, 2**31 - 1, 0)}


def run_trace(model: OpenModel, options: Mapping[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Trace one kind at a time (same seeded noise each time, so equal to one joint trace), reporting progress."""
    from workbench.tracing import causal_trace

    kinds = list(options["kinds"])
    with model.compute() as h:
        merged: dict[str, Any] | None = None
        for i, kind in enumerate(kinds):
            ctx.progress(i / len(kinds), f"tracing {kind} ({i + 1} of {len(kinds)})")
            trace = causal_trace(h, options["prompt"], options["subject"], target=options["target_true"],
                                 kinds=(kind,), window=options["window"], n_samples=options["samples"],
                                 seed=options["seed"])
            data = trace.to_json()
            if merged is None:
                merged = data
            else:
                for key in ("scores", "indirect_effects", "peaks"):
                    merged[key].update(data[key])
        assert merged is not None
        ctx.progress(0.95, "top answers")
        merged["answers"] = top_answers(h, merged["prompt"], 10)
        merged["fingerprint"] = model.fingerprint()
        merged["edits_applied"] = len(model.stack())
        merged["message"] = f"traced {', '.join(kinds)}"
        return merged


# --- edit ----------------------------------------------------------------------------------

def edit_request(model: OpenModel, body: Mapping[str, Any]) -> tuple[dict[str, Any], Rewrite]:
    """The frozen prediction document (what will be hashed) and the rewrite, after every check."""
    with model.compute():
        h = require_fact_model(model)
        method = body.get("method", "rome")
        if method not in METHODS:
            raise WorkbenchError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        layer = check_layer(body.get("layer"), h.arch.n_layers)
        fact_token = body.get("fact_token", "subject_last")
        if fact_token not in FACT_TOKENS:
            raise WorkbenchError(f"fact_token {fact_token!r}: expected one of {', '.join(FACT_TOKENS)}")
        rw = full_rewrite(h, body.get("prompt"), body.get("subject"), body.get("target"), body.get("target_true"))
        pred = body.get("prediction")
        if not isinstance(pred, Mapping):
            raise WorkbenchError("prediction is missing: give which prompts should change, which should not, and by "
                                 "how much (prediction.expect)")
        change = prompt_list(pred.get("should_change"), "should_change")
        keep = prompt_list(pred.get("should_not_change"), "should_not_change")
        expect_in = pred.get("expect") or {}
        if not isinstance(expect_in, Mapping):
            raise WorkbenchError("prediction.expect must be an object like {\"prompt_p_new_min\": 0.5}")
        unknown = sorted(set(expect_in) - set(DEFAULT_EXPECT))
        if unknown:
            raise WorkbenchError(f"prediction.expect has unknown field(s) {unknown}; known: {', '.join(DEFAULT_EXPECT)}")
        expect = {k: share(expect_in.get(k, v), k) for k, v in DEFAULT_EXPECT.items()}
        note = text_field(pred.get("note", ""), "note", required=False) or ""
        rw = dataclasses.replace(rw, case_id="app", paraphrase_prompts=tuple(change), neighborhood_prompts=tuple(keep))
        for text in [rw.text, *change, *keep]:
            check_fits(h.model, len(encode_prompt(h.tokenizer, text)) + 8, f"prompt {text!r} with its target")
        prediction = {
            "model": model.spec, "model_fingerprint": model.fingerprint(),
            "edit": {"method": method, "layer": layer, "fact_token": fact_token},
            "rewrite": {"prompt": rw.prompt, "subject": rw.subject, "target_new": rw.target_new,
                        "target_true": rw.target_true},
            "should_change": change, "should_not_change": keep, "expect": expect, "note": note,
        }
        return prediction, rw


def measure(h: Any, rw: Rewrite, change: Sequence[str], keep: Sequence[str]) -> dict[str, Any]:
    """P(target_new) and P(target_true) on the prompt, the prompts that should change and those that should not."""
    from workbench.counterfact import generate_texts, score_continuations

    tok = h.tokenizer
    new_ids, true_ids = target_token_ids(tok, rw.target_new), target_token_ids(tok, rw.target_true)
    groups = {"prompt": [rw.text], "should_change": list(change), "should_not_change": list(keep)}
    pairs = []
    for texts in groups.values():
        for text in texts:
            ids = encode_prompt(tok, text)
            pairs += [(ids, new_ids), (ids, true_ids)]
    logp, _ = score_continuations(h, pairs)
    out: dict[str, Any] = {}
    n = 0
    for name, texts in groups.items():
        rows = []
        for text in texts:
            rows.append({"prompt": text, "p_new": math.exp(float(logp[n])), "p_true": math.exp(float(logp[n + 1]))})
            n += 2
        out[name] = rows
    out["generated"] = generate_texts(h, [rw.text], max_new_tokens=8, top_k=None)[0]
    return out


def _share(rows: Sequence[Mapping[str, float]], new_wins: bool) -> float | None:
    if not rows:
        return None
    return sum((r["p_new"] > r["p_true"]) == new_wins for r in rows) / len(rows)


def verdict(expect: Mapping[str, float], before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Each expectation beside its measurement, then held / failed / inconclusive."""
    clauses = []

    def clause(name: str, what: str, predicted: float, measured: float | None, was: float | None) -> None:
        holds = None if measured is None else measured >= predicted
        clauses.append({"name": name, "what": what, "predicted": predicted, "measured": measured, "before": was,
                        "holds": holds, "held_before": None if was is None else was >= predicted})

    clause("prompt_p_new_min", "P(target_new) on the prompt is at least", expect["prompt_p_new_min"],
           after["prompt"][0]["p_new"], before["prompt"][0]["p_new"])
    clause("change_share_min", "share of should-change prompts where P(new) > P(true) is at least",
           expect["change_share_min"], _share(after["should_change"], True), _share(before["should_change"], True))
    clause("keep_share_min", "share of should-not-change prompts where P(true) > P(new) is at least",
           expect["keep_share_min"], _share(after["should_not_change"], False),
           _share(before["should_not_change"], False))
    judged = [c for c in clauses if c["holds"] is not None]
    if any(not c["holds"] for c in judged):
        outcome = "failed"
    elif all(c["held_before"] for c in judged if c["name"] != "keep_share_min"):
        outcome = "inconclusive"  # what should change already had changed: the edit did not make it so
    else:
        outcome = "held"
    return {"verdict": outcome, "clauses": clauses}


def run_edit(model: OpenModel, prediction: Mapping[str, Any], rw: Rewrite, ctx: JobContext) -> dict[str, Any]:
    """Measure, fit at the chosen site, apply on top of the stack, measure again, judge."""
    import editors
    from workbench_protocols.editing import EditSite, editor_at, score_rewrites, trim_scores

    edit = prediction["edit"]
    change, keep = prediction["should_change"], prediction["should_not_change"]
    with model.compute() as h:
        ctx.progress(0.05, "measuring the unedited model")
        before = measure(h, rw, change, keep)
        cf_before = trim_scores(score_rewrites(h, [rw])[0])
        ctx.progress(0.3, f"fitting {edit['method']} at layer {edit['layer']}")
        editor = editor_at(edit["method"], h, EditSite(edit["layer"], edit["fact_token"], (), "given"))
        batch = bool(getattr(editors.get(edit["method"]), "BATCH", False))
        base = {"prediction": dict(prediction), "prediction_sha256": sha256_json(prediction), "before": before,
                "counterfact_before": cf_before, "editor": _config(editor)}
        try:
            delta = editor.fit(h, [rw] if batch else rw)
        except WorkbenchError as exc:
            reason = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            return {**base, "refused": reason, "after": before, "counterfact_after": cf_before, "edit": None,
                    "verdict": "failed", "clauses": [], "message": f"{edit['method']} refused the edit"}
        ctx.commit("applying the edit")
        entry = model.push(delta, {"id": ctx.state.id, "job": ctx.state.id, "method": edit["method"],
                                     "layer": edit["layer"], "fact_token": edit["fact_token"],
                                     "rewrite": prediction["rewrite"],
                                     "prediction_sha256": base["prediction_sha256"]})
        ctx.progress(0.75, "measuring the edited model")
        after = measure(h, rw, change, keep)
        cf_after = trim_scores(score_rewrites(h, [rw])[0])
        judged = verdict(prediction["expect"], before, after)
        return {**base, "refused": None, "after": after, "counterfact_after": cf_after, "edit": entry,
                "update_norm": sum(entry["norms"].values()), **judged,
                "message": f"{edit['method']} applied; verdict {judged['verdict']}"}


def _config(editor: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(editor):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(editor).items()}
    return {"repr": repr(editor)}
