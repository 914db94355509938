"""Development versus held-out models: do the predictions and the method ranking carry over?

Every default of the workbench was chosen on the development models (the dev suite). A run on
the held-out suite (`workbench.suite.heldout_suite`) repeats the same studies, with the same
frozen predictions, on models nobody tuned on. `compare(dev, heldout)` sets the two runs side
by side, from their stored study results alone:

- per study and prediction: the size's basis, the method it speaks for, the verdict and the
  measured value with its interval on each suite, and the gap (held-out minus dev);
- per method (replications left out, as in `workbench.calibration`): the share of its
  predictions that held and the median relative size error on each suite, and the gap;
- the leaderboard of interpretability methods on held-out models first, each method's dev win
  rate and rank beside it, and the methods that lose their lead: a win rate whose interval was
  above one half on dev and is not on held-out, or a rank that fell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from workbench.calibration import calibration, leaderboard
from workbench.errors import WorkbenchError

HALF = 0.5


def _suite_name(results: Sequence[Mapping[str, Any]]) -> str | None:
    names = {str((r.get("suite") or {}).get("name")) for r in results if r.get("suite")}
    return names.pop() if len(names) == 1 else None


def _by_key(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    return {(r["study"], r["id"]): r for r in rows}


def _gap(a: Any, b: Any) -> float | None:
    ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (a, b))
    return b - a if ok else None


def _side(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"verdict": row["verdict"], "measured": row["measured"], "ci": row["ci"], "predicted": row["predicted"]}


def _per_model(results: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, str]]:
    """(study, prediction id) -> model spec -> that model's own verdict (from each study's `by_model`)."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for res in results:
        for spec, mine in (res.get("by_model") or {}).items():
            for pid, v in (mine.get("verdicts") or {}).items():
                out.setdefault((res["study"], pid), {})[spec] = v.get("verdict")
    return out


def compare(dev: Sequence[Mapping[str, Any]], heldout: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The side-by-side of two runs' study results (lists as `workbench.reproduce.collect` returns)."""
    if not dev or not heldout:
        raise WorkbenchError("compare needs the study results of a dev run and of a held-out run; one is empty")
    shared = sorted({r["study"] for r in dev} & {r["study"] for r in heldout})
    if not shared:
        raise WorkbenchError("the dev and held-out runs share no study; run the same studies on both suites")
    dev_r = [r for r in dev if r["study"] in shared]
    held_r = [r for r in heldout if r["study"] in shared]
    dev_hash = {r["study"]: r["prediction_sha256"] for r in dev_r}
    changed = [r["study"] for r in held_r if r["prediction_sha256"] != dev_hash[r["study"]]]
    dev_cal, held_cal = calibration(dev_r), calibration(held_r)
    dev_rows, held_rows = _by_key(dev_cal["predictions"]), _by_key(held_cal["predictions"])
    models = _per_model(held_r)
    predictions = []
    for key in sorted(set(dev_rows) | set(held_rows)):
        d, h = dev_rows.get(key), held_rows.get(key)
        base = h or d
        assert base is not None
        predictions.append({
            "study": key[0], "id": key[1], "claim": base["claim"], "method": base["method"], "basis": base["basis"],
            "metric": base["metric"], "primary": base["primary"], "dev": _side(d), "heldout": _side(h),
            "heldout_by_model": models.get(key, {}),
            "gap": _gap(d and d["measured"], h and h["measured"]),
            "same_verdict": None if d is None or h is None else d["verdict"] == h["verdict"],
        })
    methods = []
    for method in sorted(set(dev_cal["by_method"]) | set(held_cal["by_method"])):
        d, h = dev_cal["by_method"].get(method), held_cal["by_method"].get(method)
        methods.append({
            "method": method,
            "dev": None if d is None else {k: d[k] for k in ("n_predictions", "held_share", "held_share_ci",
                                                              "median_abs_rel_error")},
            "heldout": None if h is None else {k: h[k] for k in ("n_predictions", "held_share", "held_share_ci",
                                                                  "median_abs_rel_error")},
            "held_share_gap": _gap(d and d["held_share"], h and h["held_share"]),
            "calibration_error_gap": _gap(d and d["median_abs_rel_error"], h and h["median_abs_rel_error"]),
        })
    return {
        "studies": shared,
        "dev_suite": _suite_name(dev_r), "heldout_suite": _suite_name(held_r),
        "predictions_changed": changed,
        "overall": {"dev": _overall(dev_cal), "heldout": _overall(held_cal)},
        "by_basis": {"dev": {k: _overall_of(v) for k, v in dev_cal["by_basis"].items()},
                     "heldout": {k: _overall_of(v) for k, v in held_cal["by_basis"].items()}},
        "predictions": predictions,
        "methods": methods,
        "leaderboard": board(leaderboard(dev_r), leaderboard(held_r)),
    }


def _overall(cal: Mapping[str, Any]) -> dict[str, Any]:
    return _overall_of(cal["overall"])


def _overall_of(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {k: summary[k] for k in ("n_predictions", "counts", "held_share", "held_share_ci", "median_abs_rel_error")}


def board(dev: Mapping[str, Any], heldout: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The held-out leaderboard in its order, each method's dev standing beside it and whether it lost its lead."""
    dev_by = {m["method"]: m for m in dev["methods"]}
    out = []
    for m in heldout["methods"]:
        d = dev_by.get(m["method"], {})
        dev_low, held_low = (d.get("win_rate_ci") or [None])[0], (m.get("win_rate_ci") or [None])[0]
        beat_on_dev = isinstance(dev_low, float) and dev_low > HALF
        beats_heldout = isinstance(held_low, float) and held_low > HALF
        fell = isinstance(d.get("rank"), int) and isinstance(m.get("rank"), int) and m["rank"] > d["rank"]
        out.append({"method": m["method"], "rank": m.get("rank"), "n": m["n"], "win_rate": m["win_rate"],
                    "win_rate_ci": m["win_rate_ci"], "dev_rank": d.get("rank"), "dev_n": d.get("n"),
                    "dev_win_rate": d.get("win_rate"), "dev_win_rate_ci": d.get("win_rate_ci"),
                    "win_rate_gap": _gap(d.get("win_rate"), m["win_rate"]),
                    "lost_lead": bool(beat_on_dev and not beats_heldout) or fell,
                    "why": "beat its control on dev (CI above 1/2), not on held-out" if beat_on_dev and not beats_heldout
                    else f"rank {d.get('rank')} on dev, {m.get('rank')} on held-out" if fell else ""})
    return out


__all__ = ["board", "compare"]
