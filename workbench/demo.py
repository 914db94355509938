"""`workbench demo`: the main job on the built-in models, written up as an HTML report.

It trains (or loads from cache) the zoo models, shows their ground truth and figures, and
runs one small finding -> prediction -> action -> measurement loop with the foundation's
own hooks: an interchange intervention on FactGPT that predicts where along the final
token's residual stream the answer becomes readable, with a control that should not move.
"""

from __future__ import annotations

import argparse
import io
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from workbench.report import Section, write_report
from workbench.storage import atomic_write_json

log = logging.getLogger(__name__)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


@torch.no_grad()
def interchange_curve(handle: Any, world: Any, *, n_pairs: int, seed: int) -> dict[str, Any]:
    """Patch prompt B's final-token residual stream into prompt A, layer by layer.

    Returns, per site, the share of pairs whose answer flips to B's object. A pair is two
    facts of one relation with different objects, asked through the same template.
    """
    from workbench.hooks import capture, patch

    rng = random.Random(seed)
    tok = handle.tokenizer
    model = handle.model
    n_layers = handle.arch.n_layers
    sites = ["hook_embed"] + [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    by_relation: dict[str, list[Any]] = {}
    for fact in world.facts:
        by_relation.setdefault(fact.relation_id, []).append(fact)
    flips = {s: 0 for s in sites}
    baseline_correct = 0
    for _ in range(n_pairs):
        rel = world.relation(rng.choice(sorted(by_relation)))
        a, b = rng.sample(by_relation[rel.relation_id], 2)
        while a.object == b.object:
            a, b = rng.sample(by_relation[rel.relation_id], 2)
        template = rng.choice(rel.templates)
        ids_a = tok(template.format(a.subject), return_tensors="pt", add_special_tokens=False)["input_ids"].to(handle.device)
        ids_b = tok(template.format(b.subject), return_tensors="pt", add_special_tokens=False)["input_ids"].to(handle.device)
        target_b = tok(world.object_token_text(b.object), add_special_tokens=False)["input_ids"][0]
        target_a = tok(world.object_token_text(a.object), add_special_tokens=False)["input_ids"][0]
        with capture(handle, sites) as donor:
            model(input_ids=ids_b)
        baseline_correct += int(model(input_ids=ids_a).logits[0, -1].argmax()) == target_a
        for site in sites:
            value = donor[site][0, -1]

            def put(act: torch.Tensor, value: torch.Tensor = value) -> torch.Tensor:
                out = act.clone()
                out[:, -1] = value
                return out

            with patch(handle, {site: put}):
                flips[site] += int(model(input_ids=ids_a).logits[0, -1].argmax()) == target_b
    return {"sites": sites, "flip_rate": [flips[s] / n_pairs for s in sites], "n_pairs": n_pairs,
            "baseline_accuracy": baseline_correct / n_pairs}


def _curve_png(curve: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    labels = ["embed"] + [f"L{i}" for i in range(len(curve["sites"]) - 1)]
    ax.plot(range(len(labels)), curve["flip_rate"], marker="o")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(-0.05, 1.05)
    ax.set_ylabel("answer flips to donor's")
    ax.set_xlabel("final-token residual stream patched after")
    ax.set_title(f"Interchange intervention on FactGPT ({curve['n_pairs']} pairs)")
    png = _png(fig)
    plt.close(fig)
    return png


def run_demo(out: Path, *, device: str = "auto", n_pairs: int = 60, seed: int = 0) -> dict[str, Any]:
    """Run the demo and write `report.html` and `results.json` into `out`."""
    from workbench import zoo
    from workbench.devices import resolve_device
    from workbench.worlds.factworld import FactWorld
    from workbench.worlds.gallery import render_gallery

    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    fact = zoo.load("factgpt", device=dev)
    shapes = zoo.load("shapesnet", device=dev)
    world: FactWorld = fact.info["world"]
    sections: list[Section] = []

    zoo_rows = []
    for h in (fact, shapes):
        i = h.info
        zoo_rows.append([i["name"], i.get("accuracy"), i.get("n_params"), i.get("train_seconds"), h.arch.family,
                         h.arch.n_layers])
    trojan_rows = [[t["name"], t["kind"], t.get("source") or "any", t["target"], t["attack_success"]]
                   for t in shapes.info.get("trojans", [])]
    sections.append(Section(
        "Model zoo",
        ["Both models were trained here on synthetic worlds whose ground truth is known; accuracy is top-1 "
         "(FactGPT: the object token of every fact under every template; ShapesNet: clean held-out scenes)."],
        tables=[(["model", "accuracy", "parameters", "train seconds", "family", "layers"], zoo_rows),
                (["trojan", "kind", "source", "target", "attack success"], trojan_rows)],
    ))

    gallery = render_gallery(out / "shapesworld.png", n=8, seed=seed)
    sections.append(Section(
        "ShapesWorld: what ShapesNet saw",
        [f"Spurious-colour accuracy (colour disagrees with the rule): {shapes.info.get('spurious')}. "
         "Rows: natural scenes, scenes that break the spurious colour rule, and each implanted trojan."],
        images=[("ShapesWorld scenes, clean and triggered", gallery.read_bytes())],
    ))

    records = world.counterfact_records(8, seed=seed)
    rows = []
    for rec in records:
        rw = rec["requested_rewrite"]
        prompt = rw["prompt"].format(rw["subject"])
        ids = fact.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(fact.device)
        with torch.no_grad():
            probs = fact.model(input_ids=ids).logits[0, -1].softmax(-1)
        top = fact.tokenizer.decode([int(probs.argmax())])

        def p(word: str) -> float:
            return float(probs[fact.tokenizer(word, add_special_tokens=False)["input_ids"][0]])

        rows.append([prompt, rw["target_true"]["str"], top, p(rw["target_true"]["str"]), rw["target_new"]["str"],
                     p(rw["target_new"]["str"])])
    sections.append(Section(
        "FactWorld records and FactGPT's answers",
        ["CounterFact-format rewrite requests (export more with <span class='mono'>workbench world export "
         "factworld</span>); P(true) should be near 1 before any edit."],
        tables=[(["prompt", "true", "top-1", "P(true)", "rewrite target", "P(new)"], rows)],
    ))

    curve = interchange_curve(fact, world, n_pairs=n_pairs, seed=seed)
    last, embed = curve["flip_rate"][-1], curve["flip_rate"][0]
    predictions = [
        ("patching the last layer's final-token residual moves the answer to the donor's", "flip rate >= 0.95", last >= 0.95, last),
        ("control: patching the final token's embedding (the same template word in both prompts) moves nothing",
         "flip rate <= 0.05", embed <= 0.05, embed),
    ]
    sections.append(Section(
        "Finding -> prediction -> action -> measurement (hooks only)",
        ["Finding: a decoder can only answer from the final position, so the subject's fact must be moved there "
         "by some layer. Action: patch the final token's residual stream from prompt B into prompt A at each site. "
         "The curve shows at which layer the answer has arrived at the final position."],
        tables=[(["prediction", "rule", "held", "measured"],
                 [[text, rule, "held" if ok else "failed", value] for text, rule, ok, value in predictions])],
        images=[("flip rate by patched site", _curve_png(curve))],
    ))

    results = {
        "zoo": {"factgpt": fact.info | {"world": None}, "shapesnet": {k: v for k, v in shapes.info.items() if k != "world"}},
        "records": rows,
        "interchange": curve,
        "predictions": [{"prediction": t, "rule": r, "held": bool(ok), "measured": v} for t, r, ok, v in predictions],
    }
    atomic_write_json(out / "results.json", results)
    write_report(out / "report.html", "Interpretability workbench: demo report", sections,
                 subtitle=f"device {dev}; seed {seed}; every number here is also in results.json")
    return {"out": str(out), "report": str(out / "report.html"),
            "predictions": results["predictions"], "factgpt_accuracy": fact.info.get("accuracy"),
            "shapesnet_accuracy": shapes.info.get("accuracy")}


def _cmd(args: argparse.Namespace) -> None:
    result = run_demo(Path(args.out), device=args.device, n_pairs=args.pairs, seed=args.seed)

    def text(r: dict[str, Any]) -> str:
        lines = [f"report: {r['report']}"]
        lines += [f"  [{'held' if p['held'] else 'FAILED'}] {p['prediction']} ({p['rule']}; measured {p['measured']:.3f})"
                  for p in r["predictions"]]
        return "\n".join(lines)

    args.emit(args, result, text)


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], emit: Callable[..., None]) -> None:
    p = sub.add_parser("demo", help="run the main job on the built-in models and write a report")
    p.add_argument("--out", default="demo-report", help="output folder (report.html, results.json)")
    p.add_argument("--pairs", type=int, default=60, help="fact pairs for the interchange intervention")
    p.add_argument("--seed", type=int, default=0)
    common(p)
    p.set_defaults(func=_cmd, emit=emit)
