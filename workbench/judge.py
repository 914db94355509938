"""The ShapesWorld judge: a small network that names what an image shows, trained without trojans.

Trojan rediscovery needs an automatic judge that compares what a method synthesized with
candidate triggers (Casper et al. 2023 used humans and CLIP), and copy/paste needs to check
that a designed patch does not show the target class's own object. Both need a model that
knows the world's visual vocabulary but never saw a trojan: this one is trained on clean
ShapesWorld pictures that each show one thing (an object of one of the 16 shapes, a background
of one of the 8 textures, or a patch of one of the 8 patterns) in random colours, places and
sizes, and it names the thing (32-way). Its output probabilities are the embedding; it never
saw a trojaned model, a poisoned image or a trigger paired with a target label (colours are
judged separately, by palette content, in `workbench_protocols.rediscovery`).

Training takes about 20-40 s on one quiet CPU thread and is cached under the workbench cache
(`judge/shapesworld-judge-v1-seed0/`, safetensors + JSON, checksum-verified), like the zoo.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from workbench.errors import CorruptFileError
from workbench.storage import atomic_write_json, cache_dir, save_safetensors, sha256_file

log = logging.getLogger(__name__)

VERSION = 4


def attribute_names() -> list[str]:
    """Output order: shape:* (16), texture:* (8, not plain), pattern:* (8)."""
    from workbench.worlds.scene import PATCH_PATTERNS, SHAPES, TEXTURES

    return [f"shape:{s}" for s in SHAPES] + [f"texture:{t}" for t in TEXTURES[1:]] + [f"pattern:{p}" for p in PATCH_PATTERNS]


@dataclass(frozen=True)
class JudgeConfig:
    n_train: int = 8000
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3
    image_size: int = 48
    channels: tuple[int, int, int] = (16, 32, 64)


def judge_data(n: int, *, seed: int, config: JudgeConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` pictures that each show one thing: an object of some shape, a textured background, or a
    patterned patch, in random colours, places and sizes (label: which thing, one of 32)."""
    from workbench.worlds.scene import (
        BACKGROUND_PALETTE,
        PALETTE,
        PATCH_PATTERNS,
        SHAPES,
        TEXTURES,
        empty_scene,
        render,
    )

    cfg = JudgeConfig() if config is None else config
    g = torch.Generator().manual_seed(seed)
    colors = torch.tensor(list(PALETTE.values()) + list(BACKGROUND_PALETTE.values()))
    n_s, n_t, n_p = len(SHAPES), len(TEXTURES) - 1, len(PATCH_PATTERNS)
    # shapes are the hardest to name: 60% of the pictures show an object, 20% a texture, 20% a patch
    group = torch.multinomial(torch.tensor([0.6, 0.2, 0.2]), n, replacement=True, generator=g)
    labels = torch.where(group == 0, torch.randint(n_s, (n,), generator=g),
                         torch.where(group == 1, n_s + torch.randint(n_t, (n,), generator=g),
                                     n_s + n_t + torch.randint(n_p, (n,), generator=g)))

    def pick(k: int) -> torch.Tensor:
        return colors[torch.randint(len(colors), (k,), generator=g)]

    scene = empty_scene(n, n_slots=1)
    # background: plain in a random colour, or (for texture items) the labelled texture
    c1, c2 = pick(n), pick(n)
    same = (c1 - c2).abs().sum(-1) < 0.2
    c2 = torch.where(same[:, None], 1.0 - c1, c2)
    is_tex = (labels >= n_s) & (labels < n_s + n_t)
    tex = torch.where(is_tex, labels - n_s + 1, torch.zeros_like(labels))
    bg_w = F.one_hot(tex, len(TEXTURES)).float()
    bg_c = torch.stack([c1, torch.where(is_tex[:, None], c2, c1)], 1)
    is_shape = labels < n_s
    shape_w = F.one_hot(torch.where(is_shape, labels, torch.zeros_like(labels)), len(SHAPES)).float()[:, None]
    obj_col = pick(n)
    clash = (obj_col - c1).abs().sum(-1) < 0.25
    obj_col = torch.where(clash[:, None], 1.0 - obj_col, obj_col)
    is_patch = labels >= n_s + n_t
    half = 0.3 + 0.6 * torch.rand(n, generator=g)
    scene = scene.replace(
        bg_weights=bg_w, bg_colors=bg_c, bg_freq=3.0 + 3.0 * torch.rand(n, generator=g),
        bg_angle=torch.rand(n, generator=g) * 3.1416, bg_phase=torch.rand(n, generator=g) * 6.28,
        bg_noise=torch.randn(n, 8, 8, generator=g),
        shape_weights=shape_w, center=(torch.rand(n, 1, 2, generator=g) * 2 - 1) * 0.4,
        size=(0.25 + 0.55 * torch.rand(n, 1, generator=g)), rotation=torch.rand(n, 1, generator=g) * 6.28,
        color=obj_col[:, None], opacity=is_shape.float()[:, None],
        patch_center=(torch.rand(n, 2, generator=g) * 2 - 1) * (1.0 - half)[:, None].clamp_min(0.05), patch_size=half,
        patch_pattern=torch.where(is_patch, labels - n_s - n_t, torch.zeros_like(labels)),
        patch_colors=torch.stack([pick(n), pick(n)], 1), patch_opacity=is_patch.float(),
    )
    images = render(scene, height=cfg.image_size).images
    return images, labels


class Judge:
    """A trained network: `embed(images)` -> probabilities over the 32 things it names (N, 32)."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        self.model = model.eval()
        self.names = names

    @torch.no_grad()
    def embed(self, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
        """Attribute probabilities for images (N, 3, H, W) in [0, 1] (resized to the judge's size)."""
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = 48
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        outs = [torch.softmax(self.model(x[i:i + batch_size]), -1) for i in range(0, len(x), batch_size)]
        return torch.cat(outs)

    def describe(self, images: torch.Tensor, *, top: int = 5) -> list[dict[str, float]]:
        probs = self.embed(images)
        out = []
        for p in probs:
            order = torch.argsort(p, descending=True)[:top].tolist()
            out.append({self.names[i]: round(float(p[i]), 3) for i in order})
        return out

    def index(self, name: str) -> int:
        return self.names.index(name)


def _entry(seed: int, cache: str | Path | None) -> Path:
    return cache_dir(cache) / "judge" / f"shapesworld-judge-v{VERSION}-seed{seed}"


def train_judge(out: Path, *, seed: int = 0, config: JudgeConfig | None = None, progress: bool = False) -> dict[str, Any]:
    """Render clean data, train the attribute network, save it to `out` (safetensors + JSON)."""
    from workbench.devices import torch_threads
    from workbench.progress import progress_bar
    from workbench.zoo.shapesnet import ShapesNetConfig, build_model

    cfg = JudgeConfig() if config is None else config
    start = time.perf_counter()
    names = attribute_names()
    with torch_threads(1):
        images, labels = judge_data(cfg.n_train, seed=seed, config=cfg)
        test_x, test_y = judge_data(600, seed=seed + 99, config=cfg)
        net_cfg = ShapesNetConfig(num_classes=len(names), channels=cfg.channels, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        model = build_model(net_cfg, seed=seed)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
        g = torch.Generator().manual_seed(seed)
        steps = cfg.n_train // cfg.batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps * cfg.epochs, pct_start=0.2)
        model.train()
        bar = progress_bar(total=steps * cfg.epochs, desc="training the ShapesWorld judge", enabled=progress)
        for _ in range(cfg.epochs):
            order = torch.randperm(cfg.n_train, generator=g)
            for b in range(steps):
                idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                loss = F.cross_entropy(model(images[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
        bar.close()
        model.eval()
        with torch.no_grad():
            acc = float((model(test_x).argmax(-1) == test_y).float().mean())
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(out / "model.safetensors", state, {"format": "pt", "model": "shapesworld-judge"})
    info = {"version": VERSION, "seed": seed, "names": names, "channels": list(cfg.channels), "n_train": cfg.n_train,
            "epochs": cfg.epochs, "test_accuracy": round(acc, 4),
            "train_seconds": round(time.perf_counter() - start, 2)}
    info["weights_sha256"] = sha256_file(out / "model.safetensors")
    atomic_write_json(out / "judge.json", info)
    return info


def load_judge(*, seed: int = 0, cache: str | Path | None = None, progress: bool = False) -> Judge:
    """The cached judge (trained on first use, retrained when its checksum fails)."""
    from workbench.storage import exclusive_lock
    from workbench.zoo.shapesnet import ShapesNet, ShapesNetConfig

    path = _entry(seed, cache)
    with exclusive_lock(path.with_suffix(".lock")):
        meta = path / "judge.json"
        ok = False
        if meta.is_file() and (path / "model.safetensors").is_file():
            try:
                info = json.loads(meta.read_text())
                ok = info.get("version") == VERSION and sha256_file(path / "model.safetensors") == info.get("weights_sha256")
            except (ValueError, OSError):
                ok = False
        if not ok:
            log.info("training the ShapesWorld judge (cached at %s)", path)
            train_judge(path, seed=seed, progress=progress)
            info = json.loads(meta.read_text())
    names = info["names"]
    model = ShapesNet(ShapesNetConfig(num_classes=len(names), channels=tuple(info["channels"]),  # type: ignore[arg-type]
                                      mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
    try:
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    except (RuntimeError, OSError) as exc:
        raise CorruptFileError(f"judge weights at {path} do not load ({exc}); delete the folder to retrain") from None
    return Judge(model, names)
