"""The feature-visualization engine: optimize an image so an objective is large.

    fv = visualize(h, channel("layer2", 5) - 0.05 * total_variation(), steps=256)
    fv.save_grid("layer2-5.png")

Works on any image model a handle describes, at the model's own input size and channel
count, in its declared input range (the model normalizes itself). Each step: the
parameterization draws images in [0, 1], transforms jitter them, they are mapped to the
input range and fed to the model with hooks on only the sites the objective reads; when no
objective needs the logits the forward pass stops at the last of those sites, and the
model's weights are frozen for the run (no weight gradients), which is where most of the
speed over a lucid-style loop comes from. A diverging run (NaN or infinite loss, gradient
or image) stops and returns the last good image marked `diverged`; Ctrl-C returns the
current image marked `interrupted`. Weights, `requires_grad` flags and train/eval mode
are restored on every exit path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from workbench.errors import UnknownSiteError, WorkbenchError
from workbench.featvis.objectives import Objective, ObjectiveContext
from workbench.featvis.param import Fourier, Parameterization
from workbench.featvis.transforms import Transform, default_transforms
from workbench.hooks import Recorder, run_with_cache
from workbench.progress import progress_bar
from workbench.storage import atomic_write, atomic_write_json, save_safetensors

if TYPE_CHECKING:
    from workbench.handle import ModelHandle

log = logging.getLogger(__name__)

Status = Literal["completed", "interrupted", "diverged"]


# --- result -------------------------------------------------------------------------------

@dataclass
class FeatureVisualization:
    """Optimized images and how they got there.

    `images` (B, C, H, W) are in the model's input range; `unit_images` the same in [0, 1].
    `loss_trace` is minus the objective per step; `snapshots` maps a step to the images
    (input range) after that many steps; `status` is completed, interrupted or diverged
    (`message` says why); `activation` is the objective per item on the final untransformed
    images; `scene`/`snapped_images` describe a SceneParam result (shape, colour, place).
    """

    images: torch.Tensor
    unit_images: torch.Tensor
    loss_trace: list[float]
    snapshots: dict[int, torch.Tensor]
    status: Status
    steps: int
    objective: str
    input_range: tuple[float, float]
    seed: int
    param: str
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    activation: list[float] = field(default_factory=list)
    scene: list[dict[str, Any]] | None = None
    snapped_images: torch.Tensor | None = None
    seconds: float = 0.0
    scenes: Any = None  # the snapped ShapesWorld Scene (SceneParam), for re-rendering variants

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"

    def save_grid(self, path: str | Path, *, snapshots: bool = False) -> Path:
        """PNG of the images (one per batch item); with `snapshots`, one row per snapshot step."""
        if snapshots and self.snapshots:
            rows = [self.snapshots[k] for k in sorted(self.snapshots)] + [self.images]
            grid = torch.cat(rows)
            return save_image_grid(grid, path, input_range=self.input_range, ncol=self.images.shape[0])
        return save_image_grid(self.images, path, input_range=self.input_range)

    def to_json(self) -> dict[str, Any]:
        return {
            "objective": self.objective, "param": self.param, "status": self.status, "message": self.message,
            "steps": self.steps, "seed": self.seed, "input_range": list(self.input_range),
            "shape": list(self.images.shape), "final_loss": self.loss_trace[-1] if self.loss_trace else None,
            "loss_trace": [round(v, 6) for v in self.loss_trace], "activation": self.activation,
            "snapshot_steps": sorted(self.snapshots), "warnings": self.warnings, "scene": self.scene,
            "seconds": round(self.seconds, 3),
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write `featvis.json`, `images.safetensors` and `grid.png` (+ `snapshots.png`) to `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"images": self.images.contiguous()}
        for step, imgs in self.snapshots.items():
            tensors[f"snapshot_{step}"] = imgs.contiguous()
        if self.snapped_images is not None:
            tensors["snapped_images"] = self.snapped_images.contiguous()
        save_safetensors(out / "images.safetensors", tensors, {"objective": self.objective})
        self.save_grid(out / "grid.png")
        if self.snapshots:
            self.save_grid(out / "snapshots.png", snapshots=True)
        atomic_write_json(out / "featvis.json", self.to_json())
        return out


def save_image_grid(images: torch.Tensor, path: str | Path, *, input_range: tuple[float, float] = (0.0, 1.0),
                    ncol: int | None = None, min_tile: int = 96, pad: int = 2) -> Path:
    """Write images (N, C, H, W) in `input_range` as one PNG grid (upscaled, nearest neighbour)."""
    import numpy as np
    from matplotlib import image as mpimg

    if images.ndim != 4 or images.shape[0] == 0:
        raise WorkbenchError(f"save_image_grid needs images (N, C, H, W) with N >= 1, got shape {tuple(images.shape)}")
    lo, hi = input_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        x = x[:, :3] if x.shape[1] > 3 else torch.cat([x, x[:, -1:].expand(-1, 3 - x.shape[1], -1, -1)], 1)
    n, _, h, w = x.shape
    factor = max(1, math.ceil(min_tile / max(h, w)))
    x = x.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    ncol = ncol or min(n, 8)
    nrow = math.ceil(n / ncol)
    th, tw = h * factor, w * factor
    canvas = torch.ones(3, nrow * (th + pad) + pad, ncol * (tw + pad) + pad)
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[:, pad + r * (th + pad): pad + r * (th + pad) + th, pad + c * (tw + pad): pad + c * (tw + pad) + tw] = x[i]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)

    def write(tmp: Path) -> None:
        mpimg.imsave(tmp, arr, format="png")

    return atomic_write(path, write)


# --- site checks --------------------------------------------------------------------------

def activation_sites(handle: ModelHandle) -> list[dict[str, Any]]:
    """Every module whose output is an image-model activation (N, C) or (N, C, H, W), with its shape."""
    model = handle.model
    x = _grey(handle, 1)
    shapes: dict[str, list[int]] = {}
    hooks = []

    def rec(name: str) -> Callable[..., None]:
        def hook(_m: Any, _a: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.ndim in (2, 4) and name not in shapes:
                shapes[name] = list(out.shape)
        return hook

    try:
        for name, module in model.named_modules():
            if name:
                hooks.append(module.register_forward_hook(rec(name)))
        with torch.no_grad():
            model(x)
    finally:
        for hk in hooks:
            hk.remove()
    return [{"name": n, "shape": s} for n, s in shapes.items()]


def _valid_sites_text(handle: ModelHandle) -> str:
    sites = activation_sites(handle)
    return ", ".join(f"{s['name']} {s['shape']}" for s in sites)


def _grey(handle: ModelHandle, n: int) -> torch.Tensor:
    pre = handle.preprocess
    assert pre is not None
    lo, hi = pre.input_range
    return torch.full((n, pre.channels, pre.height, pre.width), (lo + hi) / 2, device=handle.device)


def require_image_model(handle: ModelHandle) -> None:
    if handle.preprocess is None:
        raise WorkbenchError(f"{handle.spec} is a {handle.kind} without image preprocessing; feature visualization "
                             "needs an image model (a handle with ImagePreprocess: size, channels, input range)")


def site_shapes(handle: ModelHandle, sites: Sequence[str]) -> tuple[dict[str, tuple[int, ...]], int | None]:
    """Activation shape of each site (checked to be an image-model activation) and the output width."""
    require_image_model(handle)
    sites = list(sites)
    x = _grey(handle, 1)
    try:
        with torch.no_grad():
            out, acts = run_with_cache(handle, x, sites)
    except UnknownSiteError as exc:
        raise UnknownSiteError(f"{exc}\nImage-model activation sites (name [shape]): {_valid_sites_text(handle)}") from None
    except WorkbenchError as exc:
        raise WorkbenchError(f"{exc}\nImage-model activation sites (name [shape]): {_valid_sites_text(handle)}") from None
    shapes: dict[str, tuple[int, ...]] = {}
    for s in sites:
        act = acts.get(s)
        if not isinstance(act, torch.Tensor) or act.ndim not in (2, 4):
            what = "never ran" if act is None else f"gave shape {list(act.shape)}"
            raise WorkbenchError(f"site {s!r} is not an image-model activation (it {what}; expected (N, C) or (N, C, H, W)). "
                                 f"Valid sites (name [shape]): {_valid_sites_text(handle)}")
        shapes[s] = tuple(act.shape)
    logits = _logits_of(out)
    n_classes = int(logits.shape[-1]) if isinstance(logits, torch.Tensor) and logits.ndim == 2 else None
    return shapes, n_classes


@contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no weight gradients inside; flags and mode restored on every exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _logits_of(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    return getattr(out, "logits", None)


def objective_recorder(handle: ModelHandle, objective: Objective) -> Recorder:
    """Hooks on the sites `objective` reads, registered once for a whole run and kept live
    (in the autograd graph). Unless the objective needs the logits, each pass stops at the
    last of those sites."""
    return Recorder(handle, sorted(objective.sites), detach=False, clone=False, stop=not objective.needs_logits)


def forward_objective(handle: ModelHandle, objective: Objective, unit_images: torch.Tensor,
                      images: torch.Tensor, *, recorder: Recorder | None = None) -> torch.Tensor:
    """Objective value per item for one forward pass (stops early when logits are not needed)."""
    if recorder is None:
        with objective_recorder(handle, objective) as own:
            return forward_objective(handle, objective, unit_images, images, recorder=own)
    out = recorder.run(images)
    logits = None if out is None else _logits_of(out)
    return objective(ObjectiveContext(acts=recorder.acts, logits=logits, images=images, unit_images=unit_images))


# --- engine -------------------------------------------------------------------------------

def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam, fused into one kernel where this torch and device support it (same update rule)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def visualize(
    handle: ModelHandle,
    objective: Objective,
    *,
    param: Parameterization | None = None,
    transforms: Transform | None = None,
    steps: int = 512,
    lr: float = 0.05,
    batch: int = 1,
    snapshots: Sequence[int] = (),
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    init: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor, float], None] | None = None,
) -> FeatureVisualization:
    """Optimize `batch` images to maximize `objective` on `handle`'s model (Adam, `steps` steps).

    `param`: Fourier (default), Pixels or SceneParam; `transforms`: a transform function
    (default `default_transforms` at the model's size; `transforms.identity()` for none);
    `snapshots`: steps after which to keep a copy of the images (0 = the start); `init`:
    start images in the model's input range (Pixels/Fourier); `callback(step, unit_images,
    loss)` runs after each step. Same seed, same images.
    """
    import time

    require_image_model(handle)
    pre = handle.preprocess
    assert pre is not None
    if not isinstance(objective, Objective):
        raise WorkbenchError(f"objective must be a featvis Objective (channel, neuron, direction, class_logit, ...), "
                             f"got {type(objective).__name__}")
    if int(steps) < 1:
        raise WorkbenchError(f"steps must be >= 1, got {steps}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise WorkbenchError(f"lr must be a positive finite number, got {lr}")
    if batch < objective.min_batch:
        raise WorkbenchError(f"objective {objective.name} needs batch >= {objective.min_batch} (diversity compares "
                             f"batch items); got batch={batch}")
    bad = [s for s in snapshots if not 0 <= int(s) <= steps]
    if bad:
        raise WorkbenchError(f"snapshot steps {bad} are outside 0..{steps}")
    model_dev = handle.device
    if device is not None:
        from workbench.devices import resolve_device

        want = resolve_device(device)
        if want.type != model_dev.type:
            raise WorkbenchError(f"the model is on {model_dev}, not {want}; load it with device={str(want)!r}")
    dev = model_dev
    lo, hi = pre.input_range
    if init is not None:
        pre.check(init if init.ndim == 4 else init[None])
        init = (init.to(dev).float() - lo) / (hi - lo)

    shapes, n_classes = site_shapes(handle, sorted(objective.sites))
    objective.check(shapes, n_classes)
    if objective.needs_logits and n_classes is None:
        raise WorkbenchError("class_logit needs a model whose output is (N, classes) logits")

    param = Fourier() if param is None else param
    g = torch.Generator().manual_seed(int(seed))
    tf = default_transforms(pre.height, pre.width) if transforms is None else transforms
    snap_steps = {int(s) for s in snapshots}
    start = time.perf_counter()

    recorder = objective_recorder(handle, objective)
    with frozen(handle.model), recorder:
        params, image_fn = param.build(batch, pre.channels, pre.height, pre.width, device=dev, generator=g, init=init)
        opt = _adam(params, lr)
        trace: list[float] = []
        snaps: dict[int, torch.Tensor] = {}
        status: Status = "completed"
        message = ""
        warnings: list[str] = []
        with torch.no_grad():
            last_good = image_fn().detach()
        if not bool(torch.isfinite(last_good).all()):
            raise WorkbenchError(f"{type(param).__name__} produced non-finite images before any step; check its settings")
        if 0 in snap_steps:
            snaps[0] = (lo + (hi - lo) * last_good).cpu()
        bar = progress_bar(total=steps, desc=f"featvis {objective.name}"[:60], enabled=progress, unit="step", leave=False)
        done = 0
        try:
            for step in range(1, steps + 1):
                unit = image_fn()
                x = tf(unit, g)
                value = forward_objective(handle, objective, unit, lo + (hi - lo) * x, recorder=recorder)
                loss = -value.sum()
                lv = float(loss.detach())
                if not math.isfinite(lv):  # a non-finite image makes the loss non-finite too
                    status, message = "diverged", f"the objective became {lv} at step {step}; kept the image from step {step - 1}"
                    break
                last_good = unit.detach()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grads = [p.grad for p in params if p.grad is not None]
                if not grads:
                    status, message = "diverged", "the objective does not depend on the image (no gradient)"
                    break
                gsum = float(sum(gr.sum() for gr in grads)) if len(grads) > 1 else float(grads[0].sum())
                if not math.isfinite(gsum):  # one reduction catches any NaN/inf entry
                    status, message = "diverged", f"non-finite gradient at step {step}; kept the image from step {step - 1}"
                    break
                if step == 1 and all(gr.numel() == 0 or float(gr.abs().max()) == 0.0 for gr in grads):
                    warnings.append("the objective's gradient was exactly zero at the start (a dead unit for this "
                                    "input?); the image may stay flat")
                opt.step()
                trace.append(lv)
                done = step
                bar.update(1)
                if step in snap_steps:
                    with torch.no_grad():
                        snaps[step] = (lo + (hi - lo) * image_fn()).detach().cpu()
                if callback is not None:
                    callback(step, unit.detach(), lv)
        except KeyboardInterrupt:
            status, message = "interrupted", f"interrupted after {done} of {steps} steps; kept the current image"
            log.warning("featvis %s", message)
        finally:
            bar.close()
        with torch.no_grad():
            final = image_fn().detach() if status != "diverged" else last_good
            if not bool(torch.isfinite(final).all()):
                final = last_good
                if status == "completed":
                    status, message = "diverged", "the last step made the image non-finite; kept the previous image"
            if status == "diverged":
                log.warning("featvis diverged: %s", message)
            images = lo + (hi - lo) * final
            activation = forward_objective(handle, objective, final, images, recorder=recorder).tolist()
            flat = final.flatten(1).std(1) < 1e-3
            if bool(flat.any()):
                warnings.append(f"{int(flat.sum())} of {batch} images are flat (no structure); the objective may be "
                                "dead at this site or the learning rate too small")
            scene = snapped = scenes = None
            if hasattr(image_fn, "describe"):
                scene = image_fn.describe()  # type: ignore[attr-defined]
                snapped = (lo + (hi - lo) * image_fn.snapped()).cpu()  # type: ignore[attr-defined]
                scenes = image_fn.scene(hard=True)  # type: ignore[attr-defined]
    return FeatureVisualization(
        images=images.cpu(), unit_images=final.cpu(), loss_trace=trace, snapshots=snaps, status=status, steps=done,
        objective=objective.name, input_range=(lo, hi), seed=int(seed), param=type(param).__name__, message=message,
        warnings=warnings, activation=[round(float(a), 6) for a in activation], scene=scene, snapped_images=snapped,
        seconds=time.perf_counter() - start, scenes=scenes,
    )
