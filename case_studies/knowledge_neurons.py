"""Study 4: knowledge neurons. Suppressing attributed neurons lowers the fact; amplifying raises it.

Finding: integrated gradients (Dai et al. 2022: 20 steps over the MLP neurons at the last
position, refined by threshold 0.2 x max and sharing across paraphrases) names a fact's
knowledge neurons; a one-pass gradient x activation attribution names another set. Action:
zero (suppress) or double (amplify) those neurons' value vectors, a `WeightDelta` from
`editors.knowledge_neuron_edit.neuron_delta`. Control: the same number of random neurons
drawn from the same layers and matched on activation (each as active on the fact's prompts
as the attributed neuron it stands for), edited by the same call. Measured on the fact's prompt and its
paraphrases: the relative change of p(answer) (Dai et al.'s measure) and of its log-odds
(which does not saturate when p is near 1); and, where no change is predicted, on facts of
other relations.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from workbench.bootstrap import Metric, mean_of, paired_difference, ratio
from workbench.casestudy import (
    Anchor,
    CaseStudy,
    Comparison,
    Control,
    Figure,
    Prediction,
    StudyContext,
    SuiteModel,
    case_seed,
    ci_above,
    ci_within,
)

ATTRIBUTIONS = ("ig", "gxa")
METHOD_NAMES = {"ig": "integrated_gradients", "gxa": "gradient_x_activation"}
MODES = {"suppress": {"mode": "suppress"}, "amplify": {"mode": "amplify", "factor": 2.0}}
N_UNRELATED = 5


@torch.no_grad()
def answer_probs(handle: Any, prompts: Sequence[str], targets: Sequence[int]) -> list[float]:
    """p(target token) after each prompt."""
    from workbench.tokens import encode_prompt

    out = []
    for prompt, target in zip(prompts, targets):
        ids = torch.tensor([encode_prompt(handle.tokenizer, prompt)], device=handle.device)
        logits = handle.model(input_ids=ids).logits[0, -1].float()
        out.append(float(torch.softmax(logits, -1)[target]))
    return out


def gradient_x_activation(handle: Any, prompts: Sequence[str], target: int) -> torch.Tensor:
    """[n_layers, d_mlp] mean over prompts of activation x d p(target) / d activation (last position)."""
    from workbench.hooks import patch
    from workbench.tokens import encode_prompt

    n_layers = handle.arch.n_layers
    total = None
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(handle.tokenizer, prompt)], device=handle.device)
        leaves: dict[int, torch.Tensor] = {}

        def keep(layer: int) -> Any:
            def fn(act: torch.Tensor) -> torch.Tensor:
                leaf = act.detach().clone().requires_grad_(True)
                leaves[layer] = leaf
                return leaf

            return fn

        with torch.enable_grad(), patch(handle, {f"blocks.{L}.mlp.hook_post": keep(L) for L in range(n_layers)}):
            logits = handle.model(input_ids=ids).logits[0, -1].float()
            prob = torch.softmax(logits, -1)[target]
            grads = torch.autograd.grad(prob, [leaves[L] for L in range(n_layers)])
        scores = torch.stack([(leaves[L][0, -1] * g[0, -1]).detach().float().cpu() for L, g in enumerate(grads)])
        total = scores if total is None else total + scores
    return total / len(prompts)


def top_neurons(scores: torch.Tensor, k: int) -> list[tuple[int, int]]:
    flat = torch.argsort(scores.flatten(), descending=True, stable=True)[:k]
    d = scores.shape[1]
    return [(int(i) // d, int(i) % d) for i in flat]


@torch.no_grad()
def last_position_activations(handle: Any, prompts: Sequence[str]) -> torch.Tensor:
    """[n_layers, d_mlp]: each MLP neuron's activation at the last position, averaged over `prompts`."""
    from workbench.hooks import capture
    from workbench.tokens import encode_prompt

    sites = [f"blocks.{layer}.mlp.hook_post" for layer in range(handle.arch.n_layers)]
    total = None
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(handle.tokenizer, prompt)], device=handle.device)
        with capture(handle, sites) as acts:
            handle.model(input_ids=ids)
        now = torch.stack([acts[s][0, -1].float().cpu() for s in sites])
        total = now if total is None else total + now
    assert total is not None
    return total / len(prompts)


def random_like(handle: Any, chosen: Sequence[tuple[int, int]], *, seed: int,
                activations: torch.Tensor | None = None, band: float = 0.05) -> list[tuple[int, int]]:
    """Random neurons matched to `chosen`: one per chosen neuron, in its layer, avoiding `chosen` (seeded).

    With `activations` ([n_layers, d_mlp], e.g. `last_position_activations` on the fact's prompts)
    each one is drawn among the neurons whose activation ranks within `band` (a share of the
    layer's width) of the chosen neuron's rank, so the control is as active on these prompts as
    the treatment and only the attribution differs. Without them, uniformly within the layer.
    """
    from editors.knowledge_neuron_edit import random_neurons

    if activations is None:
        per_layer: dict[int, int] = {}
        for layer, _ in chosen:
            per_layer[layer] = per_layer.get(layer, 0) + 1
        out: list[tuple[int, int]] = []
        for j, (layer, n) in enumerate(sorted(per_layer.items())):
            out += random_neurons(handle, n, seed=seed + j, layers=[layer], exclude=chosen)
        return out
    gen = torch.Generator().manual_seed(seed)
    taken = {(int(a), int(b)) for a, b in chosen}
    out = []
    for layer, neuron in chosen:
        order = torch.argsort(activations[layer], stable=True)  # rank 0: the least active
        rank = {int(i): r for r, i in enumerate(order.tolist())}
        width = activations.shape[1]
        half = max(1, round(band * width))
        lo, hi = max(0, rank[neuron] - half), min(width, rank[neuron] + half + 1)
        pool = [int(i) for i in order[lo:hi].tolist() if (layer, int(i)) not in taken]
        while not pool and (lo > 0 or hi < width):  # widen until a neuron is free
            lo, hi = max(0, lo - half), min(width, hi + half)
            pool = [int(i) for i in order[lo:hi].tolist() if (layer, int(i)) not in taken]
        pick = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        taken.add((layer, pick))
        out.append((layer, pick))
    return out


def _logodds(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


class Study(CaseStudy):
    name = "knowledge_neurons"
    number = 4
    world = "factgpt"
    title = "Knowledge neurons: suppress and amplify attributed neurons vs random neurons"
    hypothesis = ("The MLP neurons that integrated gradients attributes a fact to carry that fact: zeroing their "
                  "value vectors lowers the answer's probability more than zeroing as many random neurons of the same "
                  "layers, doubling them raises it more, and facts of other relations do not move.")
    controls = (
        Control("random neurons", "one random neuron per attributed one, same layer, matched on its activation at "
                "the fact's prompts; same edit call"),
        Control("other relations", "facts of other relations, measured under the same edit (no change predicted)"),
    )
    anchors = (
        Anchor("Suppressing knowledge neurons: mean drop of p(correct), BERT / ParaRel", 0.29, "drop_ig",
               "Dai et al. 2022", "same measure and refinement, different model (causal LM) and data"),
        Anchor("Amplifying (x2) knowledge neurons: mean rise of p(correct), BERT", 0.31, "rise_ig",
               "Dai et al. 2022", "same measure; our answers are near p = 1, so the rise saturates"),
    )
    methods = ("integrated_gradients", "gradient_x_activation")
    tune_target = "kn"
    quick_seeds = 5
    default_seeds = 5

    def options(self) -> dict[str, Any]:
        return {"cases_per_seed": 4 if self.quick else 20, "ig_steps": 20,
                "threshold": 0.2, "share": 0.5, "max_neurons": 5, "amplify_factor": 2.0,
                "unrelated_facts": N_UNRELATED, "records_seed": "400 + seed",
                "neurons": "refined IG set (top 5 by mean attribution; top 5 unrefined if none pass); "
                           "gradient x activation: top 5 of the mean over prompts"}

    def predictions(self) -> list[Prediction]:
        return [
            Prediction("ig_suppress_beats_random", "zeroing IG knowledge neurons lowers p(answer) by at least 2% "
                       "(relative) more than zeroing random neurons of the same layers", "suppress_ig_minus_random",
                       "increase", ci_above(0.02), size=0.29, method="integrated_gradients",
                       source="Dai et al. 2022: -29% on average for knowledge neurons (BERT, ParaRel)", basis="paper"),
            Prediction("ig_amplify_beats_random", "doubling IG knowledge neurons raises the answer's log-odds by at "
                       "least 0.1 more than doubling random neurons", "amplify_logodds_ig_minus_random", "increase",
                       ci_above(0.1), size=0.5, method="integrated_gradients",
                       source="Dai et al. 2022: +31% p(correct) when amplified x2 (our size in log-odds is a guess)",
                       basis="guess"),
            Prediction("other_facts_unchanged", "zeroing a fact's IG neurons moves facts of other relations by less "
                       "than 5% (relative p)", "unrelated_change_ig", "none", ci_within(-0.05, 0.05), size=0.0,
                       source="Dai et al. 2022: other relations' facts barely change", basis="paper"),
            Prediction("gxa_suppress_beats_random", "the one-pass gradient x activation attribution also picks "
                       "neurons whose suppression beats random by 2%", "suppress_gxa_minus_random", "increase",
                       ci_above(0.02), size=0.1, method="gradient_x_activation",
                       source="first-order approximation of IG; size a guess", primary=False, basis="guess"),
            Prediction("ig_attribution_sizes_the_drop", "the IG attributions of the chosen neurons, summed, give the "
                       "drop of p(answer) when they are zeroed: measured drop / summed attribution within [0.5, 2]",
                       "drop_over_attribution_ig", "none", ci_within(0.5, 2.0), size=1.0, method="integrated_gradients",
                       source="rule: IG's completeness with a zero baseline (Sundararajan et al. 2017), applied to the "
                              "attribution made in this run on this model; per case the predicted drop is the sum of "
                              "the chosen neurons' mean attributions (last position), the action zeroes their value "
                              "vectors at every position", primary=False, basis="finding"),
            Prediction("gxa_attribution_sizes_the_drop", "the gradient x activation scores of the chosen neurons, "
                       "summed, give the drop of p(answer) when they are zeroed (first-order Taylor): measured / "
                       "predicted within [0.5, 2]", "drop_over_attribution_gxa", "none", ci_within(0.5, 2.0), size=1.0,
                       method="gradient_x_activation",
                       source="rule: first-order Taylor expansion around the activations, applied to this run's "
                              "scores on this model", primary=False, basis="finding"),
        ]

    def metrics(self) -> list[Metric]:
        out: list[Metric] = []
        for a in ATTRIBUTIONS:
            out += [
                paired_difference(f"suppress_{a}_minus_random", f"drop_{a}", f"drop_rand_{a}",
                                  description=f"relative drop of p(answer): {a} neurons minus random neurons"),
                paired_difference(f"amplify_logodds_{a}_minus_random", f"rise_lo_{a}", f"rise_lo_rand_{a}",
                                  description=f"rise of the answer's log-odds when doubled: {a} minus random"),
                mean_of(f"drop_{a}", f"drop_{a}", description=f"relative drop of p(answer), {a} neurons zeroed"),
                mean_of(f"drop_rand_{a}", f"drop_rand_{a}", description="same, random neurons"),
                mean_of(f"rise_{a}", f"rise_{a}", description=f"relative rise of p(answer), {a} neurons doubled"),
                mean_of(f"rise_rand_{a}", f"rise_rand_{a}", description="same, random neurons"),
                mean_of(f"drop_lo_{a}", f"drop_lo_{a}", description=f"drop of log-odds, {a} neurons zeroed"),
                mean_of(f"unrelated_change_{a}", f"unrelated_{a}",
                        description=f"relative change of other relations' p(answer), {a} neurons zeroed"),
                mean_of(f"n_neurons_{a}", f"n_{a}", description="neurons edited"),
            ]
        out.append(mean_of("p_before", "p_before", description="p(answer) before any edit"))
        out.append(mean_of("refined_count_ig", "refined_ig", description="IG neurons passing threshold and sharing"))
        out += [Metric(f"drop_over_attribution_{a}", (f"pdrop_{a}", f"pdrop_pred_{a}"), combine=ratio,
                       description=f"mean drop of p(answer) with the {a} neurons zeroed over the drop their summed "
                                   "attributions predict") for a in ATTRIBUTIONS]
        return out

    def setup(self, ctx: StudyContext, model: SuiteModel | None) -> dict[str, Any]:
        assert model is not None
        handle = ctx.model(model.spec)
        return {"handle": handle, "world": handle.info["world"]}

    def _rewrites(self, state: Mapping[str, Any], seed: int) -> list[Any]:
        from workbench_protocols.editing import rewrites_for

        return rewrites_for(state["handle"], self.options()["cases_per_seed"], seed=400 + seed)

    def case_keys(self, state: Any, seed: int) -> list[str]:
        return [str(rw.case_id) for rw in self._rewrites(state, seed)]

    def run_case(self, state: Any, seed: int, key: str) -> dict[str, Any]:
        from editors.knowledge_neuron_edit import neuron_delta
        from workbench.knowledge_neurons import attribute_neurons
        from workbench.requests import target_token_ids

        handle, world, opts = state["handle"], state["world"], self.options()
        rw = next(r for r in self._rewrites(state, seed) if str(r.case_id) == key)
        tok = handle.tokenizer
        prompts = [rw.text, *rw.paraphrase_prompts]
        target = target_token_ids(tok, rw.target_true)[0]
        rng = random.Random(case_seed(seed, key))
        others = [f for f in world.facts if f.relation_id != rw.relation_id]
        unrelated = rng.sample(others, N_UNRELATED)
        u_prompts = [world.relation(f.relation_id).templates[0].format(f.subject) for f in unrelated]
        u_targets = [target_token_ids(tok, world.object_token_text(f.object))[0] for f in unrelated]
        before = answer_probs(handle, prompts, [target] * len(prompts))
        u_before = answer_probs(handle, u_prompts, u_targets)

        attribution = attribute_neurons(handle, prompts, target, steps=opts["ig_steps"], threshold=opts["threshold"],
                                        share=opts["share"])
        k = opts["max_neurons"]
        ig = [(n.layer, n.neuron) for n in attribution.neurons[:k]] or [(n.layer, n.neuron) for n in attribution.ranked(k)]
        gxa_scores = gradient_x_activation(handle, prompts, target)
        gxa = top_neurons(gxa_scores, k)
        chosen = {"ig": ig, "gxa": gxa}
        ig_mean = attribution.mean_scores
        # what each finding says zeroing its neurons does to p(answer): the sum of their scores (mean over prompts)
        predicted = {"ig": sum(float(ig_mean[attribution.layers.index(L), n]) for L, n in ig),
                     "gxa": sum(float(gxa_scores[L, n]) for L, n in gxa)}
        result: dict[str, Any] = {"subject": rw.subject, "prompts": prompts, "target": rw.target_true,
                                  "p_before": before, "unrelated_before": u_before, "refined_ig": len(attribution.neurons),
                                  "neurons": {}, "effects": {}, "predicted_drop": predicted, "comparisons": []}
        activations = last_position_activations(handle, prompts)
        for a in ATTRIBUTIONS:
            rand = random_like(handle, chosen[a], seed=case_seed(seed, key + a) % (2**31), activations=activations)
            result["neurons"][a] = {"chosen": [list(n) for n in chosen[a]], "random": [list(n) for n in rand]}
            for cond, neurons in ((a, chosen[a]), (f"rand_{a}", rand)):
                for mode, kw in MODES.items():  # treatment and control: the same delta builder, only the neurons differ
                    delta = neuron_delta(handle, neurons, **kw)
                    with delta.applied(handle.model):
                        after = answer_probs(handle, prompts, [target] * len(prompts))
                        u_after = answer_probs(handle, u_prompts, u_targets) if mode == "suppress" else None
                    result["effects"][f"{mode}:{cond}"] = {"p_after": after, "unrelated_after": u_after}
            eff = _case_effects(result, a)
            result["comparisons"].append(Comparison(
                METHOD_NAMES[a], "suppress attributed neurons", "relative drop of p(answer)", eff["drop"],
                eff["drop_rand"], "random neurons, same layers, matched on activation").to_json())
            result["comparisons"].append(Comparison(
                METHOD_NAMES[a], "amplify attributed neurons x2", "rise of answer log-odds", eff["rise_lo"],
                eff["rise_lo_rand"], "random neurons, same layers, matched on activation").to_json())
        return result

    def rows(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
        row: dict[str, Any] = {"subject": record["subject"], "p_before": sum(record["p_before"]) / len(record["p_before"]),
                               "refined_ig": record["refined_ig"]}
        for a in ATTRIBUTIONS:
            eff = _case_effects(record, a)
            row.update({f"drop_{a}": eff["drop"], f"drop_rand_{a}": eff["drop_rand"], f"rise_{a}": eff["rise"],
                        f"rise_rand_{a}": eff["rise_rand"], f"rise_lo_{a}": eff["rise_lo"],
                        f"rise_lo_rand_{a}": eff["rise_lo_rand"], f"drop_lo_{a}": eff["drop_lo"],
                        f"unrelated_{a}": eff["unrelated"], f"n_{a}": len(record["neurons"][a]["chosen"]),
                        f"layers_{a}": " ".join(str(n[0]) for n in record["neurons"][a]["chosen"])})
            if "predicted_drop" in record:
                after = record["effects"][f"suppress:{a}"]["p_after"]
                row[f"pdrop_{a}"] = (sum(record["p_before"]) - sum(after)) / len(after)
                row[f"pdrop_pred_{a}"] = record["predicted_drop"][a]
        return [row]

    def figures(self, results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Figure]:
        from workbench import study_plots

        met = results["metrics"]
        groups = ["drop of p (suppress)", "rise of p (amplify)"]
        series = {}
        for a in ATTRIBUTIONS:
            series[f"{METHOD_NAMES[a]} neurons"] = [(met[f"drop_{a}"]["value"], *met[f"drop_{a}"]["ci"]),
                                                    (met[f"rise_{a}"]["value"], *met[f"rise_{a}"]["ci"])]
            series[f"random (same layers as {a})"] = [(met[f"drop_rand_{a}"]["value"], *met[f"drop_rand_{a}"]["ci"]),
                                                      (met[f"rise_rand_{a}"]["value"], *met[f"rise_rand_{a}"]["ci"])]
        return [study_plots.bars(
            "fig_neuron_edits.png", "Relative change of p(answer) on the fact's prompts when the attributed neurons "
            "(or as many random neurons of the same layers) are zeroed or doubled; 95% CIs. Dotted: Dai et al.'s "
            "BERT numbers.", groups, series, ylabel="relative change of p(answer)",
            published={"Dai et al. 2022": [0.29, 0.31]})]


def _rel(before: Sequence[float], after: Sequence[float]) -> float:
    return sum((a - b) / max(b, 1e-12) for b, a in zip(before, after)) / len(before)


def _case_effects(record: Mapping[str, Any], a: str) -> dict[str, float]:
    eff = record["effects"]
    before = record["p_before"]
    lo_before = [_logodds(p) for p in before]

    def lo_change(after: Sequence[float]) -> float:
        return sum(_logodds(p) - b for p, b in zip(after, lo_before)) / len(before)

    return {
        "drop": -_rel(before, eff[f"suppress:{a}"]["p_after"]),
        "drop_rand": -_rel(before, eff[f"suppress:rand_{a}"]["p_after"]),
        "rise": _rel(before, eff[f"amplify:{a}"]["p_after"]),
        "rise_rand": _rel(before, eff[f"amplify:rand_{a}"]["p_after"]),
        "rise_lo": lo_change(eff[f"amplify:{a}"]["p_after"]),
        "rise_lo_rand": lo_change(eff[f"amplify:rand_{a}"]["p_after"]),
        "drop_lo": -lo_change(eff[f"suppress:{a}"]["p_after"]),
        "unrelated": _rel(record["unrelated_before"], eff[f"suppress:{a}"]["unrelated_after"]),
    }
