"""A circuit's figure: its faithfulness curve beside random circuits', and its scores as a heatmap.

The heatmap is receivers x senders for edge circuits (kept edges outlined), layers x (heads,
MLP) for transformer nodes, and blocks x channels for CNNs, so where the circuit lives reads
at a glance.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from workbench.circuits.graph import Circuit
from workbench.plotting import pyplot, save_figure


def _matrix(circuit: Circuit) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Scores and kept flags laid out as a matrix, with row and column labels (NaN where no component)."""
    comps = list(circuit.components)
    scores = dict(zip(comps, circuit.scores))
    kept = dict(zip(comps, circuit.kept))
    if circuit.level == "edge":
        pairs = [c.split("->", 1) for c in comps]
        cols = list(dict.fromkeys(u for u, _ in pairs))
        rows = list(dict.fromkeys(v for _, v in pairs))
        keys = [[f"{u}->{v}" for u in cols] for v in rows]
    elif all("." in c and c.rsplit(".", 1)[1].startswith("c") for c in comps):  # CNN channels: SITE.cN
        rows = list(dict.fromkeys(c.rsplit(".", 1)[0] for c in comps))
        width = max(sum(1 for c in comps if c.rsplit(".", 1)[0] == r) for r in rows)
        cols = [str(i) for i in range(width)]
        keys = [[f"{r}.c{i}" for i in range(width)] for r in rows]
    else:  # transformer nodes: input, a{L}.h{H}, m{L}
        layers = sorted({int(c[1:].split(".")[0]) for c in comps if c[0] in "am" and c != "input"})
        heads = sorted({int(c.split(".h")[1]) for c in comps if ".h" in c})
        rows = ["input"] + [f"layer {layer}" for layer in layers]
        cols = [f"h{h}" for h in heads] + ["mlp"]
        keys = [["input"] + [""] * len(heads)] + [[f"a{layer}.h{h}" for h in heads] + [f"m{layer}"] for layer in layers]
    values = np.array([[scores.get(k, math.nan) for k in row] for row in keys], dtype=float)
    mask = np.array([[bool(kept.get(k, False)) for k in row] for row in keys])
    return values, mask, rows, cols


def plot_circuit(circuit: Circuit, path: str | os.PathLike[str]) -> Path:
    """Write the circuit's figure as a PNG (atomically)."""
    plt = pyplot()
    fig, (ax_curve, ax_map) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.4]})
    res = circuit.results
    signed = circuit.ranking == "signed"
    for key, label, style in (("curve", circuit.method + ("" if signed else " by |score|"), "-o"),
                              ("cpr_curve", None if signed else circuit.method + " by signed score", "-^"),
                              ("random_curve", "random", "--s")):
        curve = res.get(key)
        if curve and label:
            x = [max(f, 1e-4) for f in curve["fractions"]]
            ax_curve.plot(x, curve["faithfulness"], style, label=f"{label} (CPR {curve['cpr']:.2f}, CMD {curve['cmd']:.2f})")
    ax_curve.axhline(1.0, color="grey", lw=0.8)
    ax_curve.axhline(0.0, color="grey", lw=0.8)
    ax_curve.set_xscale("log")
    ax_curve.set_xlabel(f"share of {circuit.level}s kept (0 drawn at 1e-4)")
    ax_curve.set_ylabel("faithfulness")
    ax_curve.set_title(f"{circuit.task} on {circuit.model}")
    ax_curve.legend(loc="best", fontsize=8)
    values, mask, rows, cols = _matrix(circuit)
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    image = ax_map.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    ys, xs = np.nonzero(mask)
    ax_map.scatter(xs, ys, s=12, facecolors="none", edgecolors="black", linewidths=0.8, label="in circuit")
    if len(rows) <= 40:
        ax_map.set_yticks(range(len(rows)), rows, fontsize=7)
    if len(cols) <= 40:
        ax_map.set_xticks(range(len(cols)), cols, fontsize=7, rotation=90)
    kept = (f"{len(circuit.nodes)} of {len(circuit.components)} nodes kept" if circuit.level == "node" else
            f"{len(circuit.edges)} of {len(circuit.components)} edges kept, {len(circuit.nodes)} nodes")
    ax_map.set_title(f"{circuit.method} {circuit.level} scores ({kept})")
    ax_map.set_xlabel("sender" if circuit.level == "edge" else ("channel" if rows and rows[0] != "input" else "component"))
    ax_map.set_ylabel("receiver" if circuit.level == "edge" else "")
    fig.colorbar(image, ax=ax_map, label="score (metric drop when patched)")
    fig.tight_layout()
    return save_figure(fig, path)
