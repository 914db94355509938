"""Study 9: concept erasure on MiniLM, a real pretrained model.

Finding: a linear probe reads sentence sentiment perfectly from the mean-pooled output of
a MiniLM sublayer (attention or MLP output projection); LEACE (Belrose et al. 2023) names
the subspace that carries it. Action: fold the LEACE eraser, fitted on training sentences,
into the projection that writes the site (`editors.concept_erasure.ConceptErasure`, a
low-rank WeightDelta). Prediction: a fresh sentiment probe on held-out sentences falls to
chance at the site, while a probe for an unrelated, independently drawn concept (topic)
moves by less than 2 points. Controls: the unedited model; erasing a random subspace of
the same rank at the same site, folded by the same code.

Also reported, as a non-primary prediction stated before the run: the residual stream
after the edited block still carries sentiment, because the skip connection carries the
concept around the erased sublayer (the unit-editors benchmark measured exactly that; MiniLM's
post-LN residual cannot take a folded eraser at all).

Sentences come from `example_sentences` (templates with sentiment and topic drawn
independently and balanced); each seed draws its own sentences, split 60/40 into the
eraser's and probes' training set and the probes' test set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from workbench.bootstrap import Metric, estimate, mean_of, paired_difference
from workbench.casestudy import (
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

BENCH = "unit-editors benchmark (benchmarks/RESULTS.md, 'LEACE on MiniLM')"
CONDITIONS = ("before", "erased", "random")


@dataclass(frozen=True)
class _Subspace:
    """An eraser-shaped orthogonal projection off a given subspace (the random control)."""

    proj_left: torch.Tensor
    proj_right: torch.Tensor
    bias: torch.Tensor | None = None


def pooled(handle: Any, sites: Sequence[str], texts: Sequence[str], *, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Mean over real tokens of each site's activation, for every text, in one pass per batch: {site: (N, d)}."""
    from workbench.hooks import capture

    out: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    tok = handle.tokenizer
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True, max_length=128)
            enc = {k: v.to(handle.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            mask = enc["attention_mask"].float()
            with capture(handle, list(sites), stop=True) as acts:
                handle.model(**enc)
            for s in sites:
                a = acts[s].float()
                out[s].append(((a * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)).cpu())
    return {s: torch.cat(v) for s, v in out.items()}


def constant_probe_accuracy(y_train: torch.Tensor, y_test: torch.Tensor) -> float:
    """Chance for a probe: test accuracy of always answering the training set's majority class.

    This is what a probe with no information reaches (LEACE's guarantee is "no better than a
    constant"); with balanced data the training majority is often the test minority, so the
    test set's own majority share would overstate chance.
    """
    values, counts = y_train.unique(return_counts=True)
    majority = values[int(counts.argmax())]
    return float((y_test == majority).float().mean())


def random_subspace(d: int, rank: int, *, seed: int) -> _Subspace:
    """A uniformly random rank-`rank` orthonormal basis (seeded), as an eraser without a constant."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    return _Subspace(proj_left=q, proj_right=q.T.contiguous())


class Study(CaseStudy):
    name = "concept_erasure"
    number = 9
    world = "minilm"
    title = "Concept erasure on MiniLM (LEACE folded into a sublayer's weights)"
    hypothesis = ("Sentiment is linearly represented in a MiniLM sublayer's output; erasing the LEACE subspace from "
                  "that output (as a weight edit) leaves a fresh probe at chance on held-out sentences, while an "
                  "unrelated concept (topic) stays decodable within 2 points, and a random subspace of the same rank "
                  "erases nothing.")
    controls = (
        Control("unedited", "the model before the edit: probes on the same sentences and site"),
        Control("random subspace", "a random orthonormal subspace of the eraser's rank, folded into the same weights by "
                                   "the same code"),
    )
    methods = ("linear_probe",)
    quick_seeds = 2
    default_seeds = 2  # full mode: 3 sites x (leace, orth) x 1200 sentences is ~2 min per seed on one loaded core

    def options(self) -> dict[str, Any]:
        quick = self.quick
        return {"sites": ["blocks.1.mlp.hook_out", "blocks.3.attn.hook_out"] if quick else
                         ["blocks.1.mlp.hook_out", "blocks.3.mlp.hook_out", "blocks.3.attn.hook_out"],
                "erase_methods": ["leace"] if quick else ["leace", "orth"],
                "n_sentences": 480 if quick else 1200, "train_share": 0.6, "sentences_seed": "500 + seed",
                "concept": "sentiment (2 classes)", "unrelated": "topic (4 classes)", "pooling": "mean over real tokens",
                "probe": "multinomial logistic regression, L2 1e-3, L-BFGS 200 steps, standardized features"}

    def predictions(self) -> list[Prediction]:
        return [
            Prediction("erased_at_chance", "after the edit a fresh sentiment probe on held-out sentences is within 5 "
                       "points of chance at the edited site", "sentiment_above_chance_erased", "none",
                       ci_within(-0.05, 0.05), size=0.0, method="linear_probe",
                       source=f"{BENCH}: 1.000 -> 0.498 at every site tried (the constant answer's accuracy there); "
                              "chance = the constant training-majority answer on the test sentences",
                              basis="replication"),
            Prediction("unrelated_kept", "a topic probe at the same site moves by less than 2 points",
                       "topic_change_erased", "none", ci_within(-0.02, 0.02), size=0.0,
                       source=f"{BENCH}: topic 1.000 -> 1.000 (no headroom to see damage)", basis="replication"),
            Prediction("beats_random_subspace", "erasing the LEACE subspace lowers sentiment probe accuracy by at least "
                       "30 points more than erasing a random subspace of the same rank", "erase_minus_random_drop",
                       "increase", ci_above(0.30), size=0.50, method="linear_probe",
                       source="LEACE guarantee (probe at chance) vs a random direction in 384 dimensions (no change)",
                       basis="paper"),
            Prediction("residual_still_decodes", "the residual stream after the edited block still carries sentiment "
                       "(probe at least 40 points above chance): the skip connection routes the concept around the "
                       "erased sublayer", "sentiment_above_chance_resid_erased", "increase", ci_above(0.40), size=0.498,
                       source=f"{BENCH}: residual after the block 1.000 -> 1.000", primary=False, basis="replication"),
            Prediction("output_still_decodes", "the model's last layer (mean-pooled) still carries sentiment after the "
                       "edit (probe at least 40 points above chance)", "sentiment_above_chance_final_erased", "increase",
                       ci_above(0.40), size=0.5, source=f"follows from {BENCH}'s residual result (the last layer was "
                                                        "not measured there)", primary=False, basis="replication"),
        ]

    def metrics(self) -> list[Metric]:
        out = [
            paired_difference("sentiment_above_chance_erased", "sent_site_erased", "chance",
                              description="sentiment probe accuracy at the site after erasure minus chance"),
            paired_difference("topic_change_erased", "topic_site_erased", "topic_site_before",
                              description="topic probe accuracy at the site, after minus before"),
            Metric("erase_minus_random_drop", (lambda r: (r["sent_site_before"] - r["sent_site_erased"])
                                               - (r["sent_site_before"] - r["sent_site_random"]),),
                   description="drop of the sentiment probe: LEACE minus the random subspace"),
            paired_difference("sentiment_above_chance_resid_erased", "sent_resid_erased", "chance",
                              description="sentiment probe accuracy on the block's residual output after the edit minus chance"),
            mean_of("chance", "chance", description="sentiment chance: test accuracy of the constant training-majority answer"),
            paired_difference("sentiment_above_chance_final_erased", "sent_final_erased", "chance",
                              description="sentiment probe on the model's last layer (mean-pooled) after the edit minus chance"),
        ]
        places = {"site": "edited site", "resid": "residual after the block", "final": "last layer"}
        for where, place in places.items():
            for concept in ("sent", "topic"):
                for cond in CONDITIONS:
                    out.append(mean_of(f"{concept}_{where}_{cond}", f"{concept}_{where}_{cond}",
                                       description=f"{'sentiment' if concept == 'sent' else 'topic'} probe accuracy, "
                                                   f"{place}, {cond}"))
        out.append(mean_of("eraser_rank", "rank", description="rank of the folded eraser"))
        out.append(mean_of("relative_weight_change", "relative_change", description="||dW|| / ||W|| of the edit"))
        return out

    def setup(self, ctx: StudyContext, model: SuiteModel | None) -> dict[str, Any]:
        assert model is not None
        return {"handle": ctx.model(model.spec), "cache": {}}

    def case_keys(self, state: Any, seed: int) -> list[str]:
        opts = self.options()
        return [f"{m}:{s}" for m in opts["erase_methods"] for s in opts["sites"]]

    def _data(self, state: dict[str, Any], seed: int) -> dict[str, Any]:
        """Sentences, labels and the unedited model's pooled representations at every site (once per seed)."""
        from editors.concept_erasure import example_sentences

        if seed not in state["cache"]:
            opts = self.options()
            texts, sent, topic = example_sentences(opts["n_sentences"], seed=500 + seed)
            n_train = int(round(opts["train_share"] * len(texts)))
            final = f"blocks.{state['handle'].arch.n_layers - 1}.hook_resid_post"
            sites = [s for site in opts["sites"] for s in (site, _resid(site))] + [final]
            state["cache"][seed] = {"texts": texts, "sent": sent, "topic": topic, "n_train": n_train, "final": final,
                                    "before": pooled(state["handle"], sorted(set(sites)), texts)}
        return state["cache"][seed]

    def run_case(self, state: Any, seed: int, key: str) -> dict[str, Any]:
        from editors.concept_erasure import ConceptData, ConceptErasure, eraser_delta, probe_accuracy

        handle = state["handle"]
        method, site = key.split(":", 1)
        data = self._data(state, seed)
        texts, n = data["texts"], data["n_train"]
        sites = [site, _resid(site), data["final"]]
        delta = ConceptErasure(site=site, method=method).fit(handle, ConceptData.of(texts[:n], data["sent"][:n]))
        rank = int(delta.extra["rank"])
        d = data["before"][site].shape[1]
        control = eraser_delta(handle, site, random_subspace(d, rank, seed=case_seed(seed, key) % (2**31)),
                               method="erase-random-control")
        reps = {"before": data["before"]}
        with delta.applied(handle.model):
            reps["erased"] = pooled(handle, sites, texts)
        with control.applied(handle.model):
            reps["random"] = pooled(handle, sites, texts)
        labels = {"sent": torch.tensor(data["sent"]), "topic": torch.tensor(data["topic"])}
        acc: dict[str, float] = {}
        for where, s in (("site", site), ("resid", _resid(site)), ("final", data["final"])):
            for concept, y in labels.items():
                for cond in CONDITIONS:
                    x = reps[cond][s]
                    acc[f"{concept}_{where}_{cond}"] = probe_accuracy(x[:n], y[:n], x[n:], y[n:])
        chance = constant_probe_accuracy(labels["sent"][:n], labels["sent"][n:])
        w = dict(handle.model.named_parameters())
        changed = [name for name in delta.names if name.endswith("weight")]
        rel = float(delta.dense(changed[0]).float().norm() / w[changed[0]].detach().float().norm()) if changed else None
        drop = acc["sent_site_before"] - acc["sent_site_erased"]
        drop_rand = acc["sent_site_before"] - acc["sent_site_random"]
        comp = Comparison("linear_probe", f"erase the LEACE subspace at {site}", "drop of sentiment probe accuracy",
                          drop, drop_rand, "random subspace of the same rank", better="higher")
        return {"site": site, "resid_site": _resid(site), "method": method, "rank": rank, "chance": chance,
                "n_train": n, "n_test": len(texts) - n, "accuracy": acc, "relative_change": rel,
                "delta_extra": {k: v for k, v in delta.extra.items() if k in ("site", "side", "module", "rank")},
                "comparisons": [comp.to_json()]}

    def rows(self, record: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [{"site": record["site"], "method": record["method"], "rank": record["rank"], "chance": record["chance"],
                 "relative_change": record.get("relative_change"), **record["accuracy"]}]

    def figures(self, results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Figure]:
        from workbench import study_plots

        if not rows:
            return []
        groups = ["sentiment, site", "topic, site", "sentiment, residual", "topic, residual", "sentiment, last layer",
                  "topic, last layer"]
        cols = ["sent_site", "topic_site", "sent_resid", "topic_resid", "sent_final", "topic_final"]
        labels = {"before": "unedited", "erased": "LEACE erased", "random": "random subspace erased"}
        series = {}
        for cond in CONDITIONS:
            pts = []
            for c in cols:
                est = estimate(rows, mean_of("m", f"{c}_{cond}", scale=100.0), n_resamples=500, seed=0)
                pts.append((est.value, est.low, est.high))
            series[labels[cond]] = pts
        chance = 100 * sum(r["chance"] for r in rows) / len(rows)
        return [study_plots.bars(
            "fig_probe_accuracy.png", "Held-out probe accuracy before and after erasing sentiment at the edited site, "
            "on the residual stream after the same block and on the last layer (95% CIs over sites and seeds). Dotted: "
            "sentiment chance (the constant training-majority answer).",
            groups, series, ylabel="probe accuracy (%)", published={"chance (sentiment)": [chance, None, chance, None, chance, None]},
            title="Probe accuracy: erased concept vs unrelated concept")]


def _resid(site: str) -> str:
    layer = site.split(".")[1]
    return f"blocks.{layer}.hook_resid_post"
