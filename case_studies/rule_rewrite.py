"""Study 10: rewrite ShapesNet's spurious colour rule ("red means square") with a constrained low-rank edit.

Finding: ShapesWorld's training data pairs red with squares, and ShapesNet learned the
shortcut: on scenes where the colours disagree with the classes (squares never red, every
other class red) its accuracy falls from ~99% to ~13%. Santurkar et al. (2021) read a layer
as an associative memory from keys to values and rewrite one rule in it. Action
(`editors.rule_rewrite.RuleRewrite`): exemplar pairs are the same non-square scenes
rendered with the main object red (keys) and in its own colour (values); the last conv
layer is updated along C^-1-weighted key directions so red objects map to what their
natural-coloured twins produce. Prediction: accuracy on colour-disagreeing scenes rises by
at least 20 points while clean accuracy moves by less than a point.

Controls, all measured on the same fresh scenes: the unedited model; a random update of
the same layer with the same rank and Frobenius norm as the rewrite; a strict rank-one
rewrite of the same layer (Santurkar et al.'s setting) vs the rank-32 default; the same
rewrite at a different layer (`layer3.conv1`, same rank). Rows are blocks of scenes, so
the intervals cover scene sampling across the seeds' fits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from workbench.bootstrap import Metric, estimate, mean_of
from workbench.casestudy import (
    CaseStudy,
    Control,
    Figure,
    Prediction,
    StudyContext,
    SuiteModel,
    case_seed,
    ci_above,
    ci_within,
)

LAYER, RANK = "layer3.conv2", 32
WRONG_LAYER = "layer3.conv1"
CONDITIONS = ("unedited", "rewrite", "rank_one", "wrong_layer", "random")
LABELS = {"unedited": "unedited", "rewrite": f"rewrite {LAYER} rank {RANK}", "rank_one": f"rewrite {LAYER} rank 1",
          "wrong_layer": f"rewrite {WRONG_LAYER} rank {RANK}", "random": f"random update, rank {RANK}, same norm"}
BENCH = "unit-editors benchmark (benchmarks/RESULTS.md, 'Rule rewrite on ShapesNet', 800 pairs, 2000 scenes)"


def random_update(handle: Any, layer: str, *, rank: int, norm: float, seed: int) -> Any:
    """A WeightDelta on `layer`'s weight: a random rank-`rank` matrix scaled to Frobenius norm `norm`."""
    from workbench.delta import WeightDelta

    weight = handle.model.get_submodule(layer).weight
    out_dim = weight.shape[0]
    in_dim = weight[0].numel()
    g = torch.Generator().manual_seed(seed)
    change = torch.randn(out_dim, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, in_dim, generator=g,
                                                                                        dtype=torch.float64)
    change = change * (norm / float(change.norm()))
    return WeightDelta.from_model(handle.model, {f"{layer}.weight": change.reshape(weight.shape).to(weight.dtype)},
                                  method="rewrite-random-control", extra={"layer": layer, "rank": rank, "norm": norm})


class Study(CaseStudy):
    name = "rule_rewrite"
    number = 10
    world = "shapesnet"
    title = "Classifier rule rewrite of the spurious colour correlation (ShapesNet)"
    hypothesis = ("ShapesNet's 'red means square' shortcut is stored in its last conv layer as a key-value association; "
                  "a constrained low-rank rewrite from red/natural-colour exemplar pairs raises accuracy on "
                  "colour-disagreeing scenes by at least 20 points at a cost of under 1 point of clean accuracy, and a "
                  "random update of the same size does not.")
    controls = (
        Control("unedited", "the model before the edit, on the same disagreeing and natural scenes"),
        Control("random update", f"a random rank-{RANK} change of {LAYER} with the rewrite's Frobenius norm"),
        Control("rank one", "the same rewrite restricted to rank 1 (Santurkar et al.'s setting)"),
        Control("wrong layer", f"the same rewrite (rank {RANK}, same exemplars) at {WRONG_LAYER}"),
    )
    methods = ()
    tune_target = None
    quick_seeds = 2
    default_seeds = 3

    def options(self) -> dict[str, Any]:
        quick = self.quick
        return {"layer": LAYER, "rank": RANK, "wrong_layer": WRONG_LAYER,
                "directions": "keys (C^-1 K*)", "n_pairs": 400 if quick else 800, "n_eval": 1000 if quick else 2000,
                "block": 100, "pairs_seed": "600 + seed", "eval_seed": "700 + seed",
                "eval": "n_eval colour-disagreeing scenes (squares never red, others red) and n_eval natural scenes"}

    def predictions(self) -> list[Prediction]:
        return [
            Prediction("disagree_gain", "accuracy on colour-disagreeing scenes rises by at least 20 points",
                       "gain_rewrite", "increase", ci_above(20.0), size=24.0,
                       source=f"{BENCH}: 0.132 -> 0.371 (+24.0) at the default", basis="replication"),
            Prediction("clean_kept", "clean accuracy moves by less than 1 point", "clean_change_rewrite", "none",
                       ci_within(-1.0, 1.0), size=-0.25, source=f"{BENCH}: 0.992 -> 0.989", basis="replication"),
            Prediction("beats_random_update", "the rewrite's gain beats a random update of the same rank and norm by at "
                       "least 15 points", "gain_rewrite_minus_random", "increase", ci_above(15.0), size=24.0,
                       source="a random direction should carry no rule; size = the rewrite's benchmark gain",
                       basis="replication"),
            Prediction("rank_k_beats_rank_one", f"rank {RANK} gains at least 5 points more than rank 1",
                       "gain_rewrite_minus_rank_one", "increase", ci_above(5.0), size=11.6,
                       source=f"{BENCH}: +24.0 (rank 32) vs +12.4 (rank 1)", primary=False, basis="replication"),
            Prediction("right_layer_beats_wrong", f"{LAYER} gains at least 5 points more than {WRONG_LAYER}",
                       "gain_rewrite_minus_wrong_layer", "increase", ci_above(5.0), size=15.2,
                       source=f"{BENCH}: +24.0 vs +8.8 ({WRONG_LAYER} at rank 8; here rank {RANK})", primary=False,
                       basis="replication"),
        ]

    def metrics(self) -> list[Metric]:
        def diff(a: str, b: str) -> Any:
            return lambda r: None if r.get(a) is None or r.get(b) is None else r[a] - r[b]

        out: list[Metric] = []
        for cond in CONDITIONS:
            out.append(mean_of(f"disagree_{cond}", f"dis_{cond}", scale=100.0, unit="%",
                               description=f"accuracy on colour-disagreeing scenes, {LABELS[cond]}"))
            out.append(mean_of(f"clean_{cond}", f"nat_{cond}", scale=100.0, unit="%",
                               description=f"accuracy on natural scenes, {LABELS[cond]}"))
            if cond != "unedited":
                out.append(Metric(f"gain_{cond}", (diff(f"dis_{cond}", "dis_unedited"),), scale=100.0, unit="points",
                                  description=f"disagree accuracy gain, {LABELS[cond]}"))
                out.append(Metric(f"clean_change_{cond}", (diff(f"nat_{cond}", "nat_unedited"),), scale=100.0,
                                  unit="points", description=f"clean accuracy change, {LABELS[cond]}"))
        for other in ("random", "rank_one", "wrong_layer"):
            out.append(Metric(f"gain_rewrite_minus_{other}", (diff("dis_rewrite", f"dis_{other}"),), scale=100.0,
                              unit="points", description=f"disagree accuracy: rewrite minus {LABELS[other]}"))
        return out

    def setup(self, ctx: StudyContext, model: SuiteModel | None) -> dict[str, Any]:
        from workbench.zoo.shapesnet import world_of

        assert model is not None
        handle = ctx.model(model.spec)
        return {"handle": handle, "world": world_of(handle)}

    def case_keys(self, state: Any, seed: int) -> list[str]:
        return ["rewrite"]

    def run_case(self, state: Any, seed: int, key: str) -> dict[str, Any]:
        from editors.rule_rewrite import RuleRewrite, colour_pairs

        handle, world, opts = state["handle"], state["world"], self.options()
        model = handle.model
        pairs = colour_pairs(world, opts["n_pairs"], seed=600 + seed)
        g = torch.Generator().manual_seed(700 + seed)
        dis = world.sample(opts["n_eval"], generator=g, color_mode="disagree")
        nat = world.sample(opts["n_eval"], generator=g)
        x_dis, x_nat = world.render(dis), world.render(nat)
        deltas = {"rewrite": RuleRewrite(layer=LAYER, rank=RANK).fit(handle, pairs),
                  "rank_one": RuleRewrite(layer=LAYER, rank=1).fit(handle, pairs),
                  "wrong_layer": RuleRewrite(layer=WRONG_LAYER, rank=RANK).fit(handle, pairs)}
        norm = float(deltas["rewrite"].dense(f"{LAYER}.weight").double().norm())
        deltas["random"] = random_update(handle, LAYER, rank=int(deltas["rewrite"].extra["rank"]), norm=norm,
                                         seed=case_seed(seed, key) % (2**31))
        was = model.training
        model.eval()
        try:
            correct = {"unedited": (_correct(model, x_dis, dis.labels), _correct(model, x_nat, nat.labels))}
            for cond, delta in deltas.items():
                with delta.applied(model):
                    correct[cond] = (_correct(model, x_dis, dis.labels), _correct(model, x_nat, nat.labels))
        finally:
            model.train(was)
        info = {c: {k: d.extra.get(k) for k in ("layer", "rank", "relative_update", "residual_before", "residual_after",
                                                 "norm")} for c, d in deltas.items()}
        return {"n_pairs": opts["n_pairs"], "n_eval": opts["n_eval"], "block": opts["block"], "edits": info,
                "correct": {c: {"disagree": _bits(a), "natural": _bits(b)} for c, (a, b) in correct.items()}}

    def rows(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
        block, n = record["block"], record["n_eval"]
        rows = []
        for i in range(0, n, block):
            row: dict[str, Any] = {"block": i // block}
            for cond, bits in record["correct"].items():
                for part, short in (("disagree", "dis"), ("natural", "nat")):
                    chunk = bits[part][i:i + block]
                    row[f"{short}_{cond}"] = chunk.count("1") / len(chunk)
            rows.append(row)
        return rows

    def figures(self, results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Figure]:
        from workbench import study_plots

        if not rows:
            return []
        groups = ["colour-disagreeing scenes", "natural scenes"]
        series = {}
        for cond in CONDITIONS:
            pts = []
            for short in ("dis", "nat"):
                est = estimate(rows, mean_of("m", f"{short}_{cond}", scale=100.0), n_resamples=500, seed=0)
                pts.append((est.value, est.low, est.high))
            series[LABELS[cond]] = pts
        return [study_plots.bars(
            "fig_rewrite_accuracy.png", "Accuracy before and after the rewrite and its controls, on fresh "
            "colour-disagreeing scenes (the spurious rule broken) and natural scenes (95% CIs over blocks of scenes "
            "across seeds).", groups, series, ylabel="accuracy (%)", title="Rewriting 'red means square'")]


@torch.no_grad()
def _correct(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> list[bool]:
    dev = next(model.parameters()).device
    pred = torch.cat([model(x[i:i + batch_size].to(dev)).argmax(-1).cpu() for i in range(0, x.shape[0], batch_size)])
    return (pred == y).tolist()


def _bits(values: Sequence[bool]) -> str:
    return "".join("1" if v else "0" for v in values)
