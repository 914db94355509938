"""Matplotlib helpers for trace figures; matplotlib is imported only when a figure is drawn."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

CMAPS: dict[str, str] = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
LABELS: dict[str, str] = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}


def figure(n_panels: int, *, height: float = 2.4) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(3.6 * n_panels + 0.4, height), dpi=150, layout="constrained")


def layer_ticks(ax: Any, n_layers: int) -> None:
    step = max(1, n_layers // 8)
    ticks = list(range(0, n_layers, step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks], fontsize=7)


def trace_heatmap(ax: Any, fig: Any, *, kind: str, scores: torch.Tensor, tokens: Sequence[str],
                  subject_span: tuple[int, int], corrupted_prob: float, target: str, window: int) -> None:
    """One kind's restored probabilities, tokens x layers, with the subject tokens starred and boxed."""
    from matplotlib.patches import Rectangle

    data = scores.numpy()
    img = ax.imshow(data, aspect="auto", cmap=CMAPS[kind], interpolation="nearest",
                    vmin=min(corrupted_prob, float(data.min())), vmax=max(float(data.max()), corrupted_prob + 1e-9))
    b, e = subject_span
    labels = [f"{tok}*" if b <= i < e else tok for i, tok in enumerate(tokens)]
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.add_patch(Rectangle((-0.5, b - 0.5), data.shape[1], e - b, fill=False, edgecolor="black", linewidth=0.8))
    layer_ticks(ax, data.shape[1])
    ax.set_title(f"Restoring the {LABELS[kind]} after corrupting the subject", fontsize=7)
    ax.set_xlabel("single restored layer" if kind == "hidden"
                  else f"centre of the {window}-layer window restored", fontsize=7)
    cb = fig.colorbar(img, ax=ax)
    cb.ax.tick_params(labelsize=6)
    cb.set_label(f"p({target.strip() or target!r})", fontsize=7)


def save_png(fig: Any, path: Path) -> Path:
    from workbench.plotting import png_bytes
    from workbench.storage import atomic_write_bytes

    return atomic_write_bytes(path, png_bytes(fig))
