"""Dataset exemplars: the natural inputs (and crops of them) that most excite a unit.

The complement of feature visualization: instead of synthesizing an input, rank a pool of
real ones by a unit's peak activation and cut out the region around the peak, sized to the
unit's receptive field (measured from gradients, so it works for any CNN). For ShapesNet
the pool is ShapesWorld scenes, whose renderer ground truth says what each crop shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workbench.errors import WorkbenchError
from workbench.featvis.render import require_image_model, save_image_grid, site_shapes
from workbench.hooks import capture

if TYPE_CHECKING:
    from workbench.handle import ModelHandle


@dataclass
class Exemplars:
    """Top-k pool items for one unit.

    `indices` into the pool, `values` the peak activation, `peaks` (k, 2) the peak's centre
    in input pixels (y, x), `boxes` (k, 4) the crop boxes (y0, x0, y1, x1), `images` the
    whole inputs and `crops` (k, C, s, s) the receptive-field-sized regions around the peaks
    (model input range).
    """

    site: str
    unit: int | str
    indices: list[int]
    values: list[float]
    peaks: torch.Tensor
    boxes: torch.Tensor
    images: torch.Tensor
    crops: torch.Tensor
    crop_size: int
    input_range: tuple[float, float] = (0.0, 1.0)
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indices)

    def save_grid(self, path: str | Path, *, crops: bool = True) -> Path:
        return save_image_grid(self.crops if crops else self.images, path, input_range=self.input_range)

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "unit": self.unit, "indices": self.indices,
                "values": [round(v, 6) for v in self.values], "peaks": self.peaks.tolist(),
                "boxes": self.boxes.tolist(), "crop_size": self.crop_size, **self.extra}


def receptive_field(handle: ModelHandle, site: str, *, n_probes: int = 4, seed: int = 0) -> int:
    """Side (pixels) of the input region that moves a central unit at `site`, measured from gradients."""
    require_image_model(handle)
    pre = handle.preprocess
    assert pre is not None
    shapes, _ = site_shapes(handle, [site])
    shape = shapes[site]
    if len(shape) != 4:
        return max(pre.height, pre.width)
    lo, hi = pre.input_range
    g = torch.Generator().manual_seed(seed)
    x = (lo + (hi - lo) * torch.rand(n_probes, pre.channels, pre.height, pre.width, generator=g)).to(handle.device)
    x.requires_grad_(True)
    h, w = shape[-2:]
    with capture(handle, [site], detach=False, clone=False, stop=True) as acts:
        handle.model(x)
    act = acts[site]
    act[:, :, h // 2, w // 2].sum().backward()
    assert x.grad is not None
    support = x.grad.abs().sum((0, 1)) > 0
    rows = torch.nonzero(support.any(1)).flatten()
    cols = torch.nonzero(support.any(0)).flatten()
    if rows.numel() == 0:
        return max(pre.height // max(h, 1), 1)
    extent = max(int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1))
    return min(extent, min(pre.height, pre.width))


def unit_activation_maps(handle: ModelHandle, site: str, unit: int | torch.Tensor, images: torch.Tensor, *,
                         batch_size: int = 256) -> torch.Tensor:
    """Activation map (N, h, w) of one channel (or a direction over channels) on `images`."""
    maps = []
    model = handle.model
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(handle.device)
        with torch.no_grad(), capture(handle, [site], stop=True) as acts:
            model(x)
        act = acts[site]
        if act.ndim == 2:
            act = act[:, :, None, None]
        if isinstance(unit, torch.Tensor):
            m = (act * unit.to(act.device, act.dtype).view(1, -1, 1, 1)).sum(1)
        else:
            m = act[:, unit]
        maps.append(m.float().cpu())
    return torch.cat(maps)


def crop_at(images: torch.Tensor, centers: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Square crops of side `size` centred on (y, x) pixel centres, shifted to stay inside."""
    n, _, h, w = images.shape
    size = min(size, h, w)
    crops, boxes = [], []
    for i in range(n):
        cy, cx = float(centers[i, 0]), float(centers[i, 1])
        y0 = int(round(cy - size / 2))
        x0 = int(round(cx - size / 2))
        y0 = min(max(y0, 0), h - size)
        x0 = min(max(x0, 0), w - size)
        crops.append(images[i, :, y0:y0 + size, x0:x0 + size])
        boxes.append([y0, x0, y0 + size, x0 + size])
    return torch.stack(crops), torch.tensor(boxes, dtype=torch.long)


def top_exemplars(handle: ModelHandle, site: str, unit: int | torch.Tensor, images: torch.Tensor, *, k: int,
                  crop_size: int | None = None, batch_size: int = 256) -> Exemplars:
    """The `k` pool images with the highest peak activation of `unit` at `site`, with crops.

    `unit` is a channel index or a direction (one weight per channel). `images` are in the
    model's input range (checked); `crop_size` defaults to the site's receptive field.
    """
    require_image_model(handle)
    pre = handle.preprocess
    assert pre is not None
    pre.check(images)
    if not 1 <= k <= len(images):
        raise WorkbenchError(f"k={k}: choose 1..{len(images)} (the pool has {len(images)} images)")
    shapes, _ = site_shapes(handle, [site])
    n_ch = shapes[site][1]
    if isinstance(unit, torch.Tensor):
        if unit.numel() != n_ch:
            raise WorkbenchError(f"direction has {unit.numel()} entries; site {site!r} has {n_ch} channels")
        unit = unit.flatten().float()
    elif not 0 <= int(unit) < n_ch:
        raise WorkbenchError(f"unit {unit} is out of range for site {site!r} ({n_ch} channels; valid 0..{n_ch - 1})")
    size = receptive_field(handle, site) if crop_size is None else int(crop_size)
    if not 1 <= size <= min(pre.height, pre.width):
        raise WorkbenchError(f"crop_size {size} must be 1..{min(pre.height, pre.width)} (the image is {pre.height}x{pre.width})")
    maps = unit_activation_maps(handle, site, unit, images, batch_size=batch_size)
    n, mh, mw = maps.shape
    flat = maps.flatten(1)
    peak_val, peak_pos = flat.max(1)
    top = torch.argsort(peak_val, descending=True)[:k]
    py = (peak_pos[top] // mw).float()
    px = (peak_pos[top] % mw).float()
    centers = torch.stack([(py + 0.5) * pre.height / mh, (px + 0.5) * pre.width / mw], 1)
    picked = images[top].detach().cpu()
    crops, boxes = crop_at(picked, centers, size)
    return Exemplars(site=site, unit=int(unit) if not isinstance(unit, torch.Tensor) else "direction",
                     indices=top.tolist(), values=peak_val[top].tolist(), peaks=centers, boxes=boxes,
                     images=picked, crops=crops, crop_size=size, input_range=pre.input_range)


def shapesworld_pool(handle: ModelHandle, n: int, *, seed: int, classes: list[str] | None = None) -> tuple[torch.Tensor, Any]:
    """`n` natural ShapesWorld scenes for a ShapesNet handle: (images in [0, 1], the Sample)."""
    from workbench.zoo.shapesnet import world_of

    world = world_of(handle)
    g = torch.Generator().manual_seed(seed)
    sample = world.sample(n, generator=g, classes=classes)
    images = world.render(sample)
    assert isinstance(images, torch.Tensor)
    return images, sample
