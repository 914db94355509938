"""The Units page: rank the units that carry a ShapesNet trojan, ablate them, measure beside random units.

One job runs the trojan-surgery protocol (`workbench_protocols.surgery`), as `workbench
ablate zoo:shapesnet --trojan NAME` does, one step at a time so it reports progress and can
be cancelled between steps: draw the scenes, rank and choose the units on selection scenes,
fold their removal into a WeightDelta, and measure attack success and clean accuracy on fresh
scenes before, after, and after as many random units (the control), plus both along the
ranking's order (1, 2, 4, ... units). The model is never changed by the job; the delta is
kept in the job's folder, and applying it puts it on the model's stack of edits like any
other (undo reverts it bit-exactly).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workbench.delta import WeightDelta
from workbench.errors import UnknownModelError, WorkbenchError
from workbench_app.editing import int_in
from workbench_app.jobs import JobContext
from workbench_app.workspace import ConflictError, OpenModel

METHODS = ("activation_difference", "attribution", "dissection", "greedy")
DELTA_FILE = "delta.safetensors"
CURVE_KS = (1, 2, 3, 4, 6, 8, 12, 16)


def require_trojan_model(model: OpenModel) -> Any:
    """The ShapesWorld of an open ShapesNet model (a one-line error for any other model)."""
    h = model.ensure_loaded()
    if h.kind != "image_classifier" or "world" not in h.info:
        raise WorkbenchError(f"{model.spec} is not a ShapesWorld model; the trojan units page needs zoo:shapesnet")
    from workbench.zoo.shapesnet import world_of

    return world_of(h)


def options(model: OpenModel) -> dict[str, Any]:
    """What the form offers for this model: its trojans, the sites searched, the methods."""
    from workbench_protocols.surgery import SURGERY_SITES

    world = require_trojan_model(model)
    return {"trojans": [{"name": t.name, "kind": t.kind, "target": t.target, "source": t.source}
                        for t in world.trojans],
            "sites": list(SURGERY_SITES), "methods": list(METHODS), "classes": list(world.classes)}


def units_request(model: OpenModel, body: Mapping[str, Any]) -> dict[str, Any]:
    """The checked options of a units job (before it starts)."""
    from workbench_protocols.surgery import SURGERY_SITES

    with model.compute():
        world = require_trojan_model(model)
        names = [t.name for t in world.trojans]
        trojan = body.get("trojan")
        if trojan not in names:
            raise WorkbenchError(f"unknown trojan {trojan!r}; {model.spec} has {', '.join(names)}")
        method = body.get("method", "activation_difference")
        if method not in METHODS:
            raise WorkbenchError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        site = body.get("site")
        if site is not None and site not in SURGERY_SITES:
            raise WorkbenchError(f"site {site!r} is not one whose units fold into weights here; choose one of "
                                 f"{', '.join(SURGERY_SITES)} (or leave it out to search them all)")
        if method == "greedy" and site is not None:
            raise WorkbenchError("method greedy chooses units across all sites; leave the site out")
        n_units = body.get("n_units")
        if n_units is not None:
            n_units = int_in(n_units, "n_units", 1, 64, 1)
        return {"trojan": trojan, "method": method, "site": site, "n_units": n_units,
                "n_eval": int_in(body.get("n_eval"), "n_eval", 50, 5000, 300),
                "n_clean": int_in(body.get("n_clean"), "n_clean", 50, 5000, 500),
                "draws": int_in(body.get("draws"), "draws", 1, 20, 3),
                "seed": int_in(body.get("seed"), "seed", 0, 2**31 - 1, 0)}


def run_units(model: OpenModel, opts: Mapping[str, Any], ctx: JobContext) -> dict[str, Any]:
    """Prepare, select, fit, measure (progress and cancellation between steps); keep the delta."""
    from workbench.classifier import eval_mode
    from workbench_protocols.surgery import (
        EvaluationConfig,
        SelectionConfig,
        SurgeryConfig,
        fit,
        measure,
        prepare_case,
        select,
    )

    config = SurgeryConfig(
        selection=SelectionConfig(method=opts["method"], site=opts["site"], n_units=opts["n_units"], n_ref=500),
        evaluation=EvaluationConfig(n_eval=opts["n_eval"], n_clean=opts["n_clean"], n_random_draws=opts["draws"],
                                    curve_ks=CURVE_KS),
        seed=opts["seed"])
    with model.compute() as h, eval_mode(h.model):
        ctx.progress(0.02, "drawing and rendering the scenes")
        case = prepare_case(h, opts["trojan"], config)
        where = opts["site"] or "every site"
        ctx.progress(0.15, f"ranking units at {where} ({opts['method']})")
        chosen = select(case, config)
        ctx.progress(0.6, f"folding the removal of {len(chosen.pairs)} unit(s) into the weights")
        delta = fit(case, chosen, config)
        ctx.progress(0.7, "measuring: after, random units, and along the ranking")
        result = measure(case, chosen, delta, config)
        fingerprint = model.fingerprint()
    delta.save(ctx.store.root / DELTA_FILE)
    result.update({"delta": DELTA_FILE, "fingerprint": fingerprint, "delta_norms": delta.norms(),
                   "message": f"{result['n_units']} unit(s) at {result['site']}: attack success "
                              f"{result['asr_before']:.2f} -> {result['asr_after']:.2f} (random units "
                              f"{result['random_asr_after']:.2f})"})
    return result


def apply(model: OpenModel, record: Mapping[str, Any], job_dir: Any) -> dict[str, Any]:
    """Put a finished units job's delta on the model's stack, if the model is as the job measured it."""
    state, result = record["state"], record.get("result")
    if state.get("kind") != "units" or state.get("model") != model.key:
        raise UnknownModelError(f"job {state.get('id')} is not a units job of {model.spec}")
    if state.get("status") != "done" or not isinstance(result, dict):
        raise ConflictError(f"job {state.get('id')} is {state.get('status')}; only a finished units job can be applied")
    if any(e["id"] == state["id"] for e in model.stack()):
        raise ConflictError(f"the ablation of job {state['id']} is already on the stack of {model.spec}")
    if model.fingerprint() != result.get("fingerprint"):
        raise ConflictError(f"{model.spec} has changed since job {state['id']} measured it (its stack of edits is "
                            "different); run the units job again on the model as it is now")
    delta = WeightDelta.load(job_dir / DELTA_FILE)
    summary = (f"trojan {result['trojan']}: {'gated' if result.get('factors') else 'removed'} {result['n_units']} "
               f"unit(s) at {result['site']} ({result['method']})")
    entry = model.push(delta, {"id": state["id"], "job": state["id"], "method": "ablate", "layer": result["site"],
                               "summary": summary, "trojan": result["trojan"], "units": result["units_by_site"]})
    return {"edit": entry, "stack": model.stack(), "fingerprint": model.fingerprint()}
