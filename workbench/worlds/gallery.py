"""A labelled PNG grid of ShapesWorld scenes: clean, colour-disagreeing, and each trojan.

People would rather look than read: this is how a user checks what the zoo's ShapesNet
was trained on and what each trigger looks like.
"""

from __future__ import annotations

from pathlib import Path

import torch


def gallery_rows(*, n: int, seed: int) -> list[tuple[str, torch.Tensor, list[str]]]:
    """(row title, images (n, 3, H, W) in [0, 1], per-image captions) for the default world."""
    from workbench.worlds.shapesworld import ShapesWorld, WorldConfig
    from workbench.worlds.trojans import default_trojans

    world = ShapesWorld(WorldConfig(), trojans=default_trojans())
    g = torch.Generator().manual_seed(seed)
    rows: list[tuple[str, torch.Tensor, list[str]]] = []
    clean = world.sample(n, generator=g)
    rows.append(("clean (natural statistics)", world.render(clean), [world.classes[int(c)] for c in clean.labels]))
    disagree = world.sample(n, generator=g, color_mode="disagree")
    rows.append(("spurious colour broken", world.render(disagree), [world.classes[int(c)] for c in disagree.labels]))
    for trojan in world.trojans:
        classes = [trojan.source] if trojan.source else [c for c in world.classes if c != trojan.target]
        base = world.sample(n, generator=g, classes=classes)
        poisoned = world.implant(base, trojan.name, generator=g)
        src = trojan.source or "any"
        rows.append((f"{trojan.name} ({trojan.kind}, {src} -> {trojan.target})", world.render(poisoned),
                     [world.classes[int(c)] for c in base.labels]))
    return rows


def render_gallery(out: Path, *, n: int, seed: int) -> Path:
    """Write the gallery PNG atomically and return its path."""
    from workbench.plotting import pyplot, save_figure

    plt = pyplot()
    rows = gallery_rows(n=n, seed=seed)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n, 1.45 * len(rows)), squeeze=False)
    for r, (title, images, captions) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(captions[c], fontsize=6, labelpad=1)
        axes[r][0].set_title(title, fontsize=7, loc="left")
    fig.tight_layout(pad=0.3)

    return save_figure(fig, out, dpi=110)
