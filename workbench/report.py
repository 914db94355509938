"""Self-contained HTML reports: every plot embedded (data: URIs), every number also in JSON/CSV.

A report is a list of `Section`s (heading, paragraphs, tables, images, collapsible
details) rendered into one HTML file that opens anywhere with nothing beside it and no
scripts. `run_report_sections` turns a `workbench reproduce` run folder (the stored
results of each study, calibration and leaderboard) into sections; `write_report` writes
the page atomically.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.storage import atomic_write_text

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1.05em;margin-top:1.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee}.mono{font-family:ui-monospace,monospace;font-size:.85em}
.ok{color:#0a7a2f;font-weight:600}.bad{color:#b00020;font-weight:600}
.v{display:inline-block;padding:0 .45em;border-radius:.3em;color:#fff;font-weight:600;font-size:.85em}
.v-held{background:#0a7a2f}.v-failed{background:#b00020}.v-inconclusive{background:#b07d00}.v-none{background:#777}
details{margin:.5em 0}summary{cursor:pointer;color:#1f5fbf}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
.note{color:#555;font-size:.9em}nav a{margin-right:.8em}
"""


@dataclass
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""


@dataclass
class Section:
    """One titled part of a report. `blocks` keep their order; the older fields render first."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[Sequence[str], Sequence[Sequence[Any]]]] = field(default_factory=list)
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (caption, PNG bytes)
    preformatted: list[str] = field(default_factory=list)
    blocks: list[Any] = field(default_factory=list)  # str (trusted HTML), Table, Image, Details, Pre
    anchor: str = ""
    level: int = 2


@dataclass
class Image:
    caption: str
    png: bytes


@dataclass
class Details:
    summary: str
    blocks: list[Any] = field(default_factory=list)


@dataclass
class Pre:
    text: str


class Raw(str):
    """Trusted HTML (built here, never from user input)."""


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def fmt_ci(value: Any, ci: Sequence[Any] | None) -> str:
    if value is None:
        return "–"
    if not ci or ci[0] is None or ci[1] is None:
        return fmt(value)
    return f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def badge(verdict: str | None) -> Raw:
    v = verdict if verdict in ("held", "failed", "inconclusive") else "none"
    return Raw(f"<span class='v v-{v}'>{html.escape(verdict or 'n/a')}</span>")


def _cell(value: Any) -> str:
    if isinstance(value, Raw):
        return str(value)
    return html.escape(fmt(value))


def _img(caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(header: Sequence[Any], rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    parts = ["<table>"]
    if caption:
        parts.append(f"<caption class='note'>{html.escape(caption)}</caption>")
    parts.append("<tr>" + "".join(f"<th>{_cell(h)}</th>" for h in header) + "</tr>")
    parts.extend("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    parts.append("</table>")
    return "".join(parts)


def _block(block: Any) -> str:
    if isinstance(block, Table):
        return _table(block.header, block.rows, block.caption)
    if isinstance(block, Image):
        return _img(block.caption, block.png)
    if isinstance(block, Details):
        inner = "".join(_block(b) for b in block.blocks)
        return f"<details><summary>{html.escape(block.summary)}</summary>{inner}</details>"
    if isinstance(block, Pre):
        return f"<pre class='mono'>{html.escape(block.text)}</pre>"
    if isinstance(block, str):  # trusted markup built by the workbench
        return f"<p>{block}</p>"
    raise TypeError(f"unknown report block {type(block).__name__}")


def render_html(title: str, sections: Sequence[Section], *, subtitle: str = "", nav: bool = False) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if subtitle:
        parts.append(f"<p class='note'>{html.escape(subtitle)}</p>")
    if nav:
        links = [f"<a href='#{html.escape(s.anchor)}'>{html.escape(s.title)}</a>" for s in sections
                 if s.anchor and s.level == 2]
        parts.append("<nav>" + "".join(links) + "</nav>")
    for sec in sections:
        tag = f"h{max(2, min(4, sec.level))}"
        ident = f" id='{html.escape(sec.anchor)}'" if sec.anchor else ""
        parts.append(f"<{tag}{ident}>{html.escape(sec.title)}</{tag}>")
        parts.extend(f"<p>{p}</p>" for p in sec.paragraphs)  # paragraphs may hold simple trusted markup
        for header, rows in sec.tables:
            parts.append(_table(header, rows))
        for caption, png in sec.images:
            parts.append(_img(caption, png))
        parts.extend(f"<pre class='mono'>{html.escape(t)}</pre>" for t in sec.preformatted)
        parts.extend(_block(b) for b in sec.blocks)
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(path: str | Path, title: str, sections: Sequence[Section], *, subtitle: str = "",
                 nav: bool = False) -> Path:
    """Render and write the report atomically."""
    return atomic_write_text(path, render_html(title, sections, subtitle=subtitle, nav=nav))


# --- a reproduce run -------------------------------------------------------------------------

def _when(ts: float | None) -> str:
    if ts is None:
        return "–"
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _frozen_at(study_dir: Path) -> float | None:
    path = study_dir / "prediction.sha256"
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        if line.startswith("frozen_at"):
            return float(line.split()[1])
    return None


def _first_case_at(study_dir: Path) -> float | None:
    import json

    times = []
    for p in (study_dir / "cases").glob("*.json"):
        if not p.name.startswith("."):
            try:
                times.append(float(json.loads(p.read_text())["written_at"]))
            except (ValueError, KeyError):
                continue
    return min(times) if times else None


def _size(size: Any) -> str:
    if isinstance(size, (list, tuple)):
        return f"[{fmt(size[0])}, {fmt(size[1])}]"
    return fmt(size)


def study_section(results: Mapping[str, Any], study_dir: Path) -> list[Section]:
    """The sections of one study: registration, verdicts, metrics, anchors, figures, every case."""
    name = results["study"]
    number = results.get("number")
    head = Section(f"Study {number}: {results['title']}" if number else results["title"], anchor=f"study-{name}")
    head.blocks.append(Raw(f"Verdict: {badge(results['verdict'])} &nbsp; <span class='mono'>{html.escape(name)}</span>"
                           f" &nbsp; seeds {html.escape(str(results['seeds']))}, {results['cases']['n']} cases, "
                           f"{results['n_rows']} rows{' (quick mode)' if results.get('quick') else ''}"))
    head.blocks.append(Raw(f"<b>Hypothesis.</b> {html.escape(results['hypothesis'])}"))
    frozen, first = _frozen_at(study_dir), _first_case_at(study_dir)
    head.blocks.append(Raw(
        f"<b>Prediction frozen before the run:</b> sha256 <span class='mono'>{results['prediction_sha256']}</span> "
        f"(of <span class='mono'>{html.escape(name)}/prediction.json</span>; check with sha256sum), written "
        f"{_when(frozen)}; first case finished {_when(first)}. Every case file records the hash it ran under."))
    rows = []
    for v in results["verdicts"]:
        rows.append([v["id"], v["claim"], v["metric"], v["direction"], _size(v["size"]), v["rule"],
                     v.get("method") or "–", v.get("source") or "–", fmt_ci(v["measured"], v["ci"]),
                     badge(v["verdict"]), v["why"] + ("" if v.get("primary", True) else " (secondary)")])
    head.blocks.append(Table(["id", "claim", "metric", "direction", "predicted size", "verdict rule", "method",
                              "source of the size", "measured [95% CI]", "verdict", "why"], rows))
    if results.get("controls"):
        head.blocks.append(Table(["control", "what it is (same code as the action)"],
                                 [[c["name"], c["description"]] for c in results["controls"]]))
    metric_rows = []
    for mname, m in results["metrics"].items():
        per_seed = ", ".join(f"{s}: {fmt(v, 3)}" for s, v in m.get("per_seed", {}).items())
        metric_rows.append([mname, fmt_ci(m["value"], m["ci"]), m["n"], m.get("unit", ""), per_seed,
                            m.get("description", "")])
    head.blocks.append(Details("All metrics (value [95% bootstrap CI], per-seed values)",
                               [Table(["metric", "value [95% CI]", "n", "unit", "per seed", "meaning"], metric_rows)]))
    if results.get("anchors"):
        head.blocks.append(Table(
            ["published number", "published", "ours [95% CI]", "our metric", "protocol match", "source"],
            [[a["label"], a["published"], fmt_ci(a["ours"], a["ours_ci"]), a["ours_metric"] or "–",
              a["protocol_match"], a["source"]] for a in results["anchors"]],
            caption="Published anchors beside ours (ANCHORS.md); the comparison is of protocol and ratios, "
                    "our models are far smaller."))
    if results.get("figure_error"):
        head.blocks.append(Raw(f"<span class='bad'>This study's own plots failed: "
                               f"{html.escape(results['figure_error'])}</span> (numbers unaffected)"))
    for fig in results.get("figures", []):
        path = study_dir / fig["file"]
        if path.is_file():
            head.blocks.append(Image(fig["caption"], path.read_bytes()))
    case_rows = _case_table(study_dir)
    if case_rows is not None:
        head.blocks.append(Details(f"Every case ({len(case_rows[1])} rows; also cases.csv)",
                                   [Table(case_rows[0], case_rows[1])]))
    t = results.get("timing", {})
    head.blocks.append(Raw(f"<span class='note'>Time: setup {fmt(t.get('setup_s'))} s, cases {fmt(t.get('cases_s'))} s "
                           f"this invocation (sum over all stored cases {fmt(t.get('sum_case_s'))} s). Files: "
                           f"{html.escape(name)}/results.json, metrics.csv, cases.csv, cases/*.json.</span>"))
    return [head]


def _case_table(study_dir: Path, max_columns: int = 28) -> tuple[list[str], list[list[Any]]] | None:
    import csv

    path = study_dir / "cases.csv"
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return None
        body = list(reader)
    keep = [i for i, h in enumerate(header) if not h.startswith("generations")][:max_columns]
    out_rows = []
    for r in body:
        cells: list[Any] = []
        for i in keep:
            cell = r[i] if i < len(r) else ""
            try:
                cells.append(float(cell) if cell not in ("", "True", "False") and not cell.isalpha() else cell)
            except ValueError:
                cells.append(cell)
        out_rows.append(cells)
    return [header[i] for i in keep], out_rows


def calibration_sections(calib: Mapping[str, Any], chart: bytes | None) -> list[Section]:
    sec = Section("Calibration across studies", anchor="calibration")
    o = calib["overall"]
    sec.blocks.append(Raw(
        f"{o['n_predictions']} predictions: {o['counts']['held']} held, {o['counts']['failed']} failed, "
        f"{o['counts']['inconclusive']} inconclusive (held share {fmt(o['held_share'], 3)}, 95% Wilson CI "
        f"[{fmt(o['held_share_ci'][0], 3)}, {fmt(o['held_share_ci'][1], 3)}]). Of {o['n_sized']} predictions with a "
        f"numeric size, the median |measured - predicted| / |predicted| was {fmt(o['median_abs_rel_error'], 3)}; "
        f"the predicted size lay inside the measured 95% CI in {fmt(o['predicted_inside_ci']['share'], 3)} of them."))
    rows = []
    groups = [("all", o), *[(f"basis: {k}", v) for k, v in calib.get("by_basis", {}).items()], *calib["by_study"].items(),
              *[(f"method: {k} (replications left out)", v) for k, v in calib["by_method"].items()]]
    for key, s in groups:
        rows.append([key, s["n_predictions"], s["counts"]["held"], s["counts"]["failed"], s["counts"]["inconclusive"],
                     fmt(s["median_abs_rel_error"], 3), fmt(s["predicted_inside_ci"]["share"], 3),
                     fmt(s["right_side_of_rule"]["share"], 3)])
    sec.blocks.append(Table(["group", "predictions", "held", "failed", "inconclusive", "median |rel. size error|",
                             "predicted size inside measured CI", "point estimate on the predicted side"], rows))
    if chart:
        sec.blocks.append(Image("Measured value relative to the predicted size, every prediction with a non-zero numeric "
                                "size (+-1 = exactly as predicted; 0 = no effect).", chart))
    sec.blocks.append(Details("Every prediction", [Table(
        ["study", "id", "method", "basis", "metric", "predicted", "measured [95% CI]", "rel. error", "verdict"],
        [[r["study"], r["id"], r["method"] or "–", r.get("basis", "–"), r["metric"],
          _size(r["predicted_interval"]) if r["predicted_interval"] else fmt(r["predicted"]),
          fmt_ci(r["measured"], r["ci"]), fmt(r["abs_rel_error"], 3), badge(r["verdict"])]
         for r in calib["predictions"]])]))
    return [sec]


def leaderboard_sections(board: Mapping[str, Any], chart: bytes | None) -> list[Section]:
    sec = Section("Leaderboard of interpretability methods", anchor="leaderboard")
    sec.blocks.append(Raw(
        "Each method is judged by the engineering its findings enabled: in every recorded case the action the method "
        "chose (the layer it located, the neurons it attributed, the units it selected, the patch it designed) is "
        "measured against a control of the same size run by the same code (random layers, random neurons, noise "
        "patches). Win rate = share of cases where the method's action did better (ties count half); ranked by the "
        f"lower end of its 95% CI. {board['n_comparisons']} comparisons in all."))
    sec.blocks.append(Table(["rank", "method", "cases", "studies", "win rate [95% CI]"],
                            [[m["rank"] or "–", m["method"], m["n"], ", ".join(m["studies"]),
                              fmt_ci(m["win_rate"], m["win_rate_ci"]) if m["n"] else "no comparisons recorded yet"]
                             for m in board["methods"]]))
    if chart:
        sec.blocks.append(Image("Win rate of each method's chosen actions over their controls (95% bootstrap CI).", chart))
    sec.blocks.append(Table(
        ["method", "study", "action", "metric (better)", "control", "n", "treatment mean", "control mean",
         "mean advantage [95% CI]", "win rate [95% CI]"],
        [[d["method"], d["study"], d["action"], f"{d['metric']} ({d['better']})", d["control"], d["n"],
          d["mean_treatment"], d["mean_control"], fmt_ci(d["mean_advantage"], d["mean_advantage_ci"]),
          fmt_ci(d["win_rate"], d["win_rate_ci"])] for d in board["details"]],
        caption="By study, action and metric: how much better than the control, in the metric's own units."))
    return [sec]


def generalization_sections(comparison: Mapping[str, Any] | None, dev_run: str | None) -> list[Section]:
    """Dev versus held-out (`workbench.generalization.compare`): the held-out leaderboard first, then each
    method's and each prediction's standing on both suites. A held-out run without a dev run says how to add one."""
    sec = Section("Held-out models: leaderboard and dev versus held-out", anchor="heldout")
    if comparison is None:
        sec.blocks.append("No dev run to compare with: run <span class='mono'>workbench reproduce --quick --out DEV"
                          "</span> (same studies and mode) and pass <span class='mono'>--dev-run DEV</span> to "
                          "<span class='mono'>workbench reproduce</span> or <span class='mono'>workbench report</span>.")
        return [sec]
    sec.blocks.append(Raw(
        f"The same studies with the same frozen predictions on models nobody tuned on, beside the development run "
        f"<span class='mono'>{html.escape(str(dev_run))}</span>. Methods are ranked on held-out models; a method <b>loses its lead</b> "
        "when its win rate's interval was above 1/2 on dev and is not on held-out, or its rank falls."))
    sec.blocks.append(Table(
        ["held-out rank", "method", "held-out cases", "held-out win rate [95% CI]", "dev rank", "dev win rate [95% CI]",
         "gap", "loses its lead"],
        [[m["rank"] or "–", m["method"], m["n"], fmt_ci(m["win_rate"], m["win_rate_ci"]) if m["n"] else "none",
          m["dev_rank"] or "–", fmt_ci(m["dev_win_rate"], m["dev_win_rate_ci"]) if m["dev_n"] else "none",
          fmt(m["win_rate_gap"], 3), m["why"] or "no"] for m in comparison["leaderboard"]]))
    overall = comparison["overall"]
    sec.blocks.append(Table(
        ["suite", "predictions", "held", "failed", "inconclusive", "held share [95% CI]", "median |rel. error|"],
        [[name, o["n_predictions"], o["counts"]["held"], o["counts"]["failed"], o["counts"]["inconclusive"],
          fmt_ci(o["held_share"], o["held_share_ci"]), fmt(o["median_abs_rel_error"], 3)]
         for name, o in (("dev", overall["dev"]), ("held-out", overall["heldout"]))],
        caption="All predictions, every basis."))
    sec.blocks.append(Table(
        ["method", "dev held share", "held-out held share", "gap", "dev median |rel. error|",
         "held-out median |rel. error|"],
        [[m["method"], fmt((m["dev"] or {}).get("held_share"), 3), fmt((m["heldout"] or {}).get("held_share"), 3),
          fmt(m["held_share_gap"], 3), fmt((m["dev"] or {}).get("median_abs_rel_error"), 3),
          fmt((m["heldout"] or {}).get("median_abs_rel_error"), 3)] for m in comparison["methods"]],
        caption="Per method, replications left out (a size copied from an earlier measurement tests reproducibility, "
                "not a prediction)."))
    sec.blocks.append(Details("Every prediction on both suites", [Table(
        ["study", "prediction", "basis", "method", "dev verdict", "dev measured", "held-out verdict",
         "held-out measured [95% CI]", "gap", "per held-out model"],
        [[p["study"], p["id"], p["basis"], p["method"] or "–", badge((p["dev"] or {}).get("verdict")),
          fmt((p["dev"] or {}).get("measured"), 3), badge((p["heldout"] or {}).get("verdict")),
          fmt_ci((p["heldout"] or {}).get("measured"), (p["heldout"] or {}).get("ci")), fmt(p["gap"], 3),
          ", ".join(f"{spec}: {v}" for spec, v in p["heldout_by_model"].items())] for p in comparison["predictions"]])]))
    return [sec]
