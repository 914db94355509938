"""Across studies: how well-calibrated were the predictions, and which methods earned trust?

`calibration(results)` pools every prediction of every study: how often it held, failed or
was inconclusive, and how far the measured value landed from the predicted size, overall,
by study, by method and by the basis of the size (a finding of the same run, a paper, a
replication of this project's own earlier measurement, a target, a guess). A replication
measures reproducibility, not what an interpretation predicts, so the by-method summary
leaves replications out.

`leaderboard(results)` ranks interpretability methods (causal tracing, integrated
gradients, activation difference, feature visualization, ...) by what their findings
predicted: over every `Comparison` the studies recorded (the action a method chose versus
its control of the same size), the share of cases where the method's action beat the
control (ties count half) and the mean advantage per study and metric, with bootstrap CIs.
Tools are judged by the engineering they enable, not by how their pictures look.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from workbench.bootstrap import estimate, mean_of, wilson_interval


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _predicted_point(size: Any) -> float | None:
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(_num(v) for v in size):
        return (size[0] + size[1]) / 2
    return float(size) if _num(size) else None


def _right_side(v: Mapping[str, Any], rule: Mapping[str, Any]) -> bool | None:
    m = v.get("measured")
    if not _num(m):
        return None
    if rule["kind"] == "ci_above":
        return m > rule["threshold"]
    if rule["kind"] == "ci_below":
        return m < rule["threshold"]
    return rule["low"] <= m <= rule["high"]


def prediction_rows(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per prediction of every study: predicted vs measured and the verdict."""
    rows = []
    for res in results:
        rules = {p["id"]: p["rule"] for p in res["prediction"]["predictions"]}
        for v in res.get("verdicts", []):
            size = v.get("size")
            point = _predicted_point(size)
            measured = v.get("measured")
            ci = v.get("ci") or [None, None]
            err = measured - point if _num(measured) and point is not None else None
            rel = abs(err) / abs(point) if err is not None and abs(point) > 1e-12 else None
            interval = list(size) if isinstance(size, (list, tuple)) else None
            rows.append({
                "study": res["study"], "id": v["id"], "claim": v["claim"], "method": v.get("method"),
                "basis": v.get("basis") or "unstated",
                "metric": v["metric"], "direction": v["direction"], "primary": v.get("primary", True),
                "predicted": point, "predicted_interval": interval, "measured": measured, "ci": ci,
                "error": err, "abs_rel_error": rel,
                "inside_predicted_interval": (interval[0] <= measured <= interval[1])
                if interval and _num(measured) else None,
                "predicted_inside_ci": (ci[0] <= point <= ci[1]) if point is not None and _num(ci[0]) and _num(ci[1])
                else None,
                "right_side_of_rule": _right_side(v, rules.get(v["id"], {"kind": "none"})) if v["id"] in rules else None,
                "verdict": v["verdict"], "why": v.get("why", ""),
            })
    return rows


def _share(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return {"share": None, "n": 0}
    k = sum(bool(v) for v in vals)
    lo, hi = wilson_interval(k, len(vals))
    return {"share": k / len(vals), "ci": [lo, hi], "n": len(vals)}


def _summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("held", "failed", "inconclusive")}
    n = len(rows)
    lo, hi = wilson_interval(counts["held"], n)
    rel = sorted(r["abs_rel_error"] for r in rows if r.get("abs_rel_error") is not None)
    median = rel[len(rel) // 2] if len(rel) % 2 else (sum(rel[len(rel) // 2 - 1: len(rel) // 2 + 1]) / 2 if rel else None)
    return {
        "n_predictions": n,
        "counts": counts,
        "held_share": counts["held"] / n if n else None,
        "held_share_ci": [lo, hi],
        "median_abs_rel_error": median,
        "mean_abs_rel_error": sum(rel) / len(rel) if rel else None,
        "n_sized": len(rel),
        "predicted_inside_ci": _share(rows, "predicted_inside_ci"),
        "inside_predicted_interval": _share(rows, "inside_predicted_interval"),
        "right_side_of_rule": _share(rows, "right_side_of_rule"),
    }


def calibration(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pooled verdict counts and size errors, overall, by study and by method."""
    rows = prediction_rows(results)
    by_study = defaultdict(list)
    by_method = defaultdict(list)
    by_basis = defaultdict(list)
    for r in rows:
        by_study[r["study"]].append(r)
        by_basis[r["basis"]].append(r)
        if r["basis"] != "replication":
            by_method[r["method"] or "(editor claims)"].append(r)
    return {
        "overall": _summary(rows),
        "by_study": {k: _summary(v) for k, v in by_study.items()},
        "by_method": {k: _summary(v) for k, v in sorted(by_method.items())},
        "by_basis": {k: _summary(v) for k, v in sorted(by_basis.items())},
        "predictions": rows,
    }


def _win(row: Mapping[str, Any]) -> float:
    a = row["advantage"]
    return 1.0 if a > 0 else 0.5 if a == 0 else 0.0


def _model(row: Mapping[str, Any]) -> str:
    return str(row.get("model"))


def leaderboard(results: Sequence[Mapping[str, Any]], *, n_resamples: int = 2000) -> dict[str, Any]:
    """Methods ranked by how often the actions their findings chose beat the controls.

    Comparisons made on several models are resampled by model, then by case (one model: by case).
    """
    comps: list[dict[str, Any]] = []
    declared: dict[str, set[str]] = defaultdict(set)
    for res in results:
        for m in res["prediction"].get("methods", []):
            declared[m].add(res["study"])
        for c in res.get("comparisons", []):
            if _num(c.get("advantage")):
                comps.append({**c, "win": _win(c)})
    win = mean_of("win_rate", "win")
    adv = mean_of("advantage", "advantage")
    methods: list[dict[str, Any]] = []
    details: list[dict[str, Any]] = []
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in comps:
        grouped[c["method"]].append(c)
    for method in sorted(set(grouped) | set(declared)):
        rows = grouped.get(method, [])
        w = estimate(rows, win, n_resamples=n_resamples, seed=1, cluster=_model)
        studies = sorted({c["study"] for c in rows} | declared.get(method, set()))
        methods.append({"method": method, "n": len(rows), "studies": studies, "win_rate": w.value,
                        "win_rate_ci": [w.low, w.high]})
        sub: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
        for c in rows:
            sub[(c["study"], c["action"], c["metric"], c["control_name"])].append(c)
        for (study, action, metric, control), cs in sorted(sub.items()):
            w2 = estimate(cs, win, n_resamples=n_resamples, seed=2, cluster=_model)
            a2 = estimate(cs, adv, n_resamples=n_resamples, seed=3, cluster=_model)
            details.append({"method": method, "study": study, "action": action, "metric": metric, "control": control,
                            "better": cs[0].get("better", "higher"), "n": len(cs), "win_rate": w2.value,
                            "win_rate_ci": [w2.low, w2.high], "mean_advantage": a2.value,
                            "mean_advantage_ci": [a2.low, a2.high],
                            "mean_treatment": sum(c["treatment"] for c in cs) / len(cs),
                            "mean_control": sum(c["control"] for c in cs) / len(cs)})

    def rank_key(r: Mapping[str, Any]) -> tuple[float, float]:
        lo = r["win_rate_ci"][0]
        return (-(lo if _num(lo) else -1.0), -(r["win_rate"] if _num(r["win_rate"]) else -1.0))

    methods.sort(key=rank_key)
    for i, m in enumerate(methods, 1):
        m["rank"] = i if m["n"] else None
    return {"methods": methods, "details": details, "n_comparisons": len(comps)}
