"""How methods talk to an image classifier: declared range, normalization, logits, classes.

Every image adversary and unit editor goes through these few functions, so none of them guesses the input
range or the normalization (the most common complaint about attack libraries): images are
always in `handle.preprocess.input_range`; when the model does *not* normalize inside
(`normalization_in_model=False`), `logits` applies `(x - mean) / std` itself. Class names
and indices are resolved with errors that list the valid ones, and a divergence check
turns NaN/inf into a reported event instead of a NaN image.

This module imports only torch and the workbench foundation (no `transformers`), so the
PGD benchmark can import it beside torchvision.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.handle import ImagePreprocess, ModelHandle

log = logging.getLogger(__name__)


class AttackDivergedError(WorkbenchError):
    """An optimization produced NaN/inf (loss or images) and nothing finite could be kept."""


def preprocess_of(handle: ModelHandle) -> ImagePreprocess:
    """The handle's ImagePreprocess, or a clear error for a model that is not an image classifier."""
    pre = handle.preprocess
    if handle.kind != "image_classifier" or pre is None:
        raise WorkbenchError(
            f"{handle.spec} is a {handle.kind} model; image adversaries need an image classifier handle "
            "with ImagePreprocess (input range, mean/std), e.g. zoo:shapesnet")
    return pre


def check_images(handle: ModelHandle, images: Any, *, what: str = "inputs") -> torch.Tensor:
    """Validate `(N, C, H, W)` float images in the declared range; returns them on the model's device."""
    pre = preprocess_of(handle)
    if not isinstance(images, torch.Tensor):
        raise WorkbenchError(f"{what} must be a float tensor (N, {pre.channels}, {pre.height}, {pre.width}); got {type(images).__name__}")
    if not images.is_floating_point():
        raise WorkbenchError(f"{what} have dtype {images.dtype}; expected float images in {pre.input_range} "
                             "(convert uint8 with images.float() / 255 and map to the range)")
    if images.ndim == 3:
        raise WorkbenchError(f"{what} have shape {tuple(images.shape)}: a single image; add the batch axis "
                             f"(images[None]) to get (1, {pre.channels}, {pre.height}, {pre.width})")
    if images.shape[0] == 0:
        raise WorkbenchError(f"{what} are empty; give at least one image")
    if not bool(torch.isfinite(images).all()):
        raise WorkbenchError(f"{what} contain NaN or inf values; expected finite values in {pre.input_range}")
    pre.check(images)
    return images.to(handle.device)


def to_model_input(pre: ImagePreprocess, images: torch.Tensor) -> torch.Tensor:
    """What the module receives: the images themselves, or normalized when the model does not normalize."""
    if pre.normalization_in_model:
        return images
    c = images.shape[1]
    mean = torch.as_tensor(pre.mean[:c], dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(pre.std[:c], dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def logits(handle: ModelHandle, images: torch.Tensor) -> torch.Tensor:
    """Class logits `(N, classes)` for images in the declared range (differentiable)."""
    pre = preprocess_of(handle)
    out = handle.model(to_model_input(pre, images))
    if not isinstance(out, torch.Tensor):
        out = getattr(out, "logits", None)
        if not isinstance(out, torch.Tensor):
            raise WorkbenchError(f"{handle.spec}: the model returned {type(out).__name__}; an image classifier must return logits")
    if out.ndim != 2:
        raise WorkbenchError(f"{handle.spec}: the model returned shape {tuple(out.shape)}; expected logits (N, classes)")
    return out


@torch.no_grad()
def predict(handle: ModelHandle, images: torch.Tensor, *, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, softmax probabilities) on the CPU, batched, without gradients."""
    preds, probs = [], []
    with eval_mode(handle.model):
        for i in range(0, len(images), batch_size):
            p = logits(handle, images[i:i + batch_size].to(handle.device)).float().softmax(-1)
            probs.append(p.cpu())
            preds.append(p.argmax(-1).cpu())
    return torch.cat(preds), torch.cat(probs)


def num_classes(handle: ModelHandle) -> int:
    """Number of classes: from the preprocess class names, else one forward pass on a blank image."""
    pre = preprocess_of(handle)
    if pre.class_names:
        return len(pre.class_names)
    lo, hi = pre.input_range
    blank = torch.full((1, pre.channels, pre.height, pre.width), (lo + hi) / 2, device=handle.device)
    with torch.no_grad(), eval_mode(handle.model):
        return int(logits(handle, blank).shape[1])


def class_name(handle: ModelHandle, index: int) -> str:
    pre = preprocess_of(handle)
    return pre.class_names[index] if 0 <= index < len(pre.class_names) else str(index)


def resolve_class(handle: ModelHandle, target: int | str | None, *, what: str = "target") -> int | None:
    """A class index from an index or a class name; None stays None; out of range is an error."""
    if target is None:
        return None
    pre = preprocess_of(handle)
    n = num_classes(handle)
    names = list(pre.class_names)
    if isinstance(target, torch.Tensor):
        if target.numel() != 1:
            raise WorkbenchError(f"{what} must be one class here; got a tensor of shape {tuple(target.shape)}")
        target = int(target)
    if isinstance(target, str):
        if target in names:
            return names.index(target)
        if target.strip().lstrip("-").isdigit():
            target = int(target)
        else:
            valid = ", ".join(names) if names else f"indices 0..{n - 1}"
            raise WorkbenchError(f"unknown {what} class {target!r}; valid: {valid}")
    if isinstance(target, bool) or not isinstance(target, int):
        raise WorkbenchError(f"{what} must be a class index or name; got {type(target).__name__}")
    if not 0 <= target < n:
        raise WorkbenchError(f"{what} class {target} is out of range: this model has {n} classes (0..{n - 1})")
    return target


def resolve_targets(handle: ModelHandle, target: Any, n: int) -> torch.Tensor | None:
    """Per-item target indices `(n,)`, from one class (index/name) or a tensor/list of them."""
    if target is None:
        return None
    if isinstance(target, (torch.Tensor, list, tuple)) and not (isinstance(target, torch.Tensor) and target.numel() == 1):
        items = target.tolist() if isinstance(target, torch.Tensor) else list(target)
        if len(items) != n:
            raise WorkbenchError(f"{len(items)} targets for {n} inputs; give one target class or one per input")
        return torch.tensor([resolve_class(handle, t) for t in items], dtype=torch.long)
    idx = resolve_class(handle, target)
    assert idx is not None
    return torch.full((n,), idx, dtype=torch.long)


def split_inputs(handle: ModelHandle, inputs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`images` or `(images, labels)` -> checked images and optional labels `(N,)` (long, CPU)."""
    labels = None
    if isinstance(inputs, (tuple, list)) and len(inputs) == 2 and isinstance(inputs[0], torch.Tensor):
        images, labels = inputs
    elif isinstance(inputs, dict) and "images" in inputs:
        images, labels = inputs["images"], inputs.get("labels")
    else:
        images = inputs
    images = check_images(handle, images)
    if labels is not None:
        labels = torch.as_tensor(labels).long().flatten().cpu()
        if labels.numel() != images.shape[0]:
            raise WorkbenchError(f"{labels.numel()} labels for {images.shape[0]} images; give one label per image")
        n = num_classes(handle)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            raise WorkbenchError(f"labels span {int(labels.min())}..{int(labels.max())}; this model has classes 0..{n - 1}")
    return images, labels


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (BatchNorm statistics frozen) and restore the previous mode after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode with parameter gradients off (attacks need input gradients only); restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    with eval_mode(model):
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


def from_unit(pre: ImagePreprocess, rgb: torch.Tensor) -> torch.Tensor:
    """Map renderer pixels `(N, 3, H, W)` in [0, 1] to the model's channels and input range.

    One-channel models get the luminance (ITU-R 601 weights); other channel counts repeat
    or truncate the RGB planes.
    """
    c = pre.channels
    if c == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
        x = (rgb * w).sum(1, keepdim=True)
    elif c == 3:
        x = rgb
    else:
        x = rgb.repeat(1, (c + 2) // 3, 1, 1)[:, :c]
    lo, hi = pre.input_range
    return lo + (hi - lo) * x


def to_unit(pre: ImagePreprocess, images: torch.Tensor) -> torch.Tensor:
    """Model-range images back to [0, 1] (for PNG grids)."""
    lo, hi = pre.input_range
    return ((images - lo) / (hi - lo)).clamp(0, 1)


def first_nonfinite(*tensors: torch.Tensor) -> bool:
    """True when any tensor holds NaN or inf."""
    return any(not bool(torch.isfinite(t).all()) for t in tensors)


def diverged_record(step: int, what: str) -> dict[str, Any]:
    log.warning("optimization diverged at step %d (%s); kept the last finite iterate", step, what)
    return {"step": step, "what": what, "action": "stopped; kept the last finite iterate"}


def world_or_default(handle: ModelHandle) -> Any:
    """The handle's ShapesWorld (ShapesNet), else the default world (for scenes on any image model)."""
    from workbench.worlds.shapesworld import ShapesWorld

    manifest = handle.info.get("world")
    if isinstance(manifest, dict) and manifest.get("world") == "shapesworld":
        return ShapesWorld.from_manifest(manifest)
    return ShapesWorld()


def render_for(handle: ModelHandle, scene: Any, *, softness: float = 0.6, batch_size: int = 512) -> torch.Tensor:
    """Render ShapesWorld scenes at the model's own size, channels and input range (no resizing).

    Non-square models get scenes stretched to their aspect ratio (the renderer's [-1, 1]
    coordinates span both axes).
    """
    from workbench.worlds.scene import render
    from workbench.worlds.shapesworld import Sample

    pre = preprocess_of(handle)
    if isinstance(scene, Sample):
        scene = scene.scene
    parts = [render(scene.index(slice(i, i + batch_size)), height=pre.height, width=pre.width, softness=softness).images
             for i in range(0, scene.n, batch_size)]
    return from_unit(pre, torch.cat(parts)).to(handle.device)
