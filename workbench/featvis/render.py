"""The feature-visualization engine: optimize an image so an objective is large.

    fv = visualize(h, channel("layer2", 5) - 0.05 * total_variation(), steps=256)
    fv.save_grid("layer2-5.png")

Works on any image model a handle describes, at the model's own input size and channel
count, in its declared input range (the model normalizes itself). Each step: the
parameterization draws images in [0, 1], transforms jitter them, they are mapped to the
input range and fed to the model with hooks on only the sites the objective reads; when no
objective needs the logits the forward pass stops at the last of those sites, and the
model's weights are frozen for the run (no weight gradients), which is where most of the
speed over a lucid-style loop comes from. The start is grey plus noise large enough, and
the padding noisy, so that units which are exactly zero on a grey image still get a
gradient; a start that gives none is discarded for one with more noise (a bounded number
of times), and a run that never gets one is marked `failed` rather than returned as a
flat image. A diverging run (NaN or infinite loss, gradient or image) stops and returns the
last good image marked `diverged`; Ctrl-C returns the current image marked `interrupted`.
Weights, `requires_grad` flags and train/eval mode are restored on every exit path.
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
from workbench.featvis.param import (
    INIT_NOISE,
    Fourier,
    Parameterization,
    check_init_noise,
    init_noise_of,
    with_init_noise,
)
from workbench.featvis.transforms import Transform, default_transforms
from workbench.hooks import Recorder, run_with_cache
from workbench.progress import progress_bar
from workbench.storage import atomic_write, atomic_write_json, save_safetensors

if TYPE_CHECKING:
    from workbench.handle import ModelHandle

log = logging.getLogger(__name__)

Status = Literal["completed", "interrupted", "diverged", "failed"]

DEAD_START_STEPS = 8  # steps a start may give a batch item no gradient before it is discarded
RESTART_NOISE_FACTOR = 3.0  # each restart multiplies the start noise by this


# --- result -------------------------------------------------------------------------------

@dataclass
class FeatureVisualization:
    """Optimized images and how they got there.

    `images` (B, C, H, W) are in the model's input range; `unit_images` the same in [0, 1].
    `loss_trace` is minus the objective per step; `snapshots` maps a step to the images
    (input range) after that many steps; `status` is completed, interrupted, diverged or
    failed (no start gave the objective a gradient, or the result is a flat image with
    objective 0: the images are not a visualization), `message` says why; `activation` is the
    objective per item on the final untransformed images; `restarts` how many dead starts were
    discarded and `init_noise` the start noise of the run kept; `scene`/`snapped_images`
    describe a SceneParam result (shape, colour, place).
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
    restarts: int = 0
    init_noise: float | None = None

    @property
    def interrupted(self) -> bool:
        return self.status == "interrupted"

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

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
            "restarts": self.restarts, "init_noise": self.init_noise, "seconds": round(self.seconds, 3),
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


def _attempt_seed(seed: int, attempt: int) -> int:
    """Generator seed of restart `attempt` (0: the run's own seed)."""
    return int(seed) if attempt == 0 else (int(seed) * 1_000_003 + attempt) % (1 << 63)


def _restart_noise(base: float | None, attempt: int) -> float:
    return max(base or 0.0, INIT_NOISE) * RESTART_NOISE_FACTOR ** attempt


def _noisy_init(init: torch.Tensor, sd: float, batch: int, g: torch.Generator) -> torch.Tensor:
    """`init` (in [0, 1]) with noise of `sd` added before the sigmoid, one draw per batch item."""
    x = init if init.ndim == 4 else init[None]
    if x.shape[0] == 1 and batch > 1:
        x = x.expand(batch, -1, -1, -1)
    t = torch.logit(x.clamp(1e-3, 1 - 1e-3))
    return torch.sigmoid(t + sd * torch.randn(tuple(x.shape), generator=g).to(x.device))


def _item_grad_max(params: list[torch.Tensor], batch: int) -> torch.Tensor:
    """Largest |gradient| per batch item (the whole batch's for a parameter without a batch axis)."""
    per = torch.zeros(batch)
    for p in params:
        if p.grad is None or p.grad.numel() == 0:
            continue
        gr = p.grad.detach()
        if gr.ndim >= 1 and gr.shape[0] == batch:
            per = torch.maximum(per, gr.reshape(batch, -1).abs().amax(1).float().cpu())
        else:
            per = torch.maximum(per, gr.abs().max().float().cpu().expand(batch))
    return per


@dataclass
class _Attempt:
    """One optimization from one start: its images, trace, and whether the start was dead."""

    params: list[torch.Tensor]
    image_fn: Callable[[], torch.Tensor]
    last_good: torch.Tensor
    trace: list[float] = field(default_factory=list)
    snaps: dict[int, torch.Tensor] = field(default_factory=dict)
    status: Status = "completed"
    message: str = ""
    done: int = 0
    dead: list[int] = field(default_factory=list)
    dead_values: list[float] = field(default_factory=list)


def _optimize(handle: ModelHandle, objective: Objective, recorder: Recorder, param: Parameterization,
              init: torch.Tensor | None, g: torch.Generator, *, batch: int, steps: int, lr: float, tf: Transform,
              snap_steps: set[int], callback: Callable[[int, torch.Tensor, float], None] | None, bar: Any) -> _Attempt:
    """Adam from one start; stops early, marked failed with `dead` set, when some batch item
    gets no gradient in any of the first DEAD_START_STEPS steps."""
    pre = handle.preprocess
    assert pre is not None
    lo, hi = pre.input_range
    params, image_fn = param.build(batch, pre.channels, pre.height, pre.width, device=handle.device, generator=g,
                                   init=init)
    opt = _adam(params, lr)
    with torch.no_grad():
        first = image_fn().detach()
    if not bool(torch.isfinite(first).all()):
        raise WorkbenchError(f"{type(param).__name__} produced non-finite images before any step; check its settings")
    run = _Attempt(params=params, image_fn=image_fn, last_good=first)
    if 0 in snap_steps:
        run.snaps[0] = (lo + (hi - lo) * first).cpu()
    window = min(steps, DEAD_START_STEPS)
    alive = torch.zeros(batch, dtype=torch.bool)
    values = torch.zeros(batch)
    try:
        for step in range(1, steps + 1):
            unit = image_fn()
            x = tf(unit, g)
            value = forward_objective(handle, objective, unit, lo + (hi - lo) * x, recorder=recorder)
            loss = -value.sum()
            lv = float(loss.detach())
            if not math.isfinite(lv):  # a non-finite image makes the loss non-finite too
                run.status, run.message = "diverged", f"the objective became {lv} at step {step}; kept the image from step {step - 1}"
                break
            run.last_good = unit.detach()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                run.status, run.message = "failed", "the objective does not depend on the image (no gradient)"
                break
            gsum = float(sum(gr.sum() for gr in grads)) if len(grads) > 1 else float(grads[0].sum())
            if not math.isfinite(gsum):  # one reduction catches any NaN/inf entry
                run.status, run.message = "diverged", f"non-finite gradient at step {step}; kept the image from step {step - 1}"
                break
            if not bool(alive.all()):
                alive |= _item_grad_max(params, batch) > 0
                values = torch.where(alive, values, value.detach().float().cpu())
                if not bool(alive.all()) and step >= window:
                    run.dead = (~alive).nonzero().flatten().tolist()
                    run.dead_values = [round(float(values[i]), 6) for i in run.dead]
                    run.status = "failed"
                    break
            opt.step()
            run.trace.append(lv)
            run.done = step
            bar.update(1)
            if step in snap_steps:
                with torch.no_grad():
                    run.snaps[step] = (lo + (hi - lo) * image_fn()).detach().cpu()
            if callback is not None:
                callback(step, unit.detach(), lv)
    except KeyboardInterrupt:
        run.status, run.message = "interrupted", f"interrupted after {run.done} of {steps} steps; kept the current image"
        log.warning("featvis %s", run.message)
    return run


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
    init_noise: float | None = None,
    restarts: int = 3,
    callback: Callable[[int, torch.Tensor, float], None] | None = None,
) -> FeatureVisualization:
    """Optimize `batch` images to maximize `objective` on `handle`'s model (Adam, `steps` steps).

    `param`: Fourier (default), Pixels or SceneParam; `transforms`: a transform function
    (default `default_transforms` at the model's size, noise in the padding;
    `transforms.identity()` for none); `snapshots`: steps after which to keep a copy of the
    images (0 = the start); `init`: start images in the model's input range (Pixels/Fourier);
    `init_noise`: the start noise (standard deviation before the sigmoid; default the
    parameterization's own, `param.INIT_NOISE` for Fourier and Pixels; with `init`, noise
    added to those images, default none); `callback(step, unit_images, loss)` runs after each
    step, including the steps of a start that is then discarded.

    A start that gives some batch item no gradient in each of its first DEAD_START_STEPS
    steps (a unit that is exactly zero on the start images) is discarded and the run starts
    again from more noise (RESTART_NOISE_FACTOR times more each time, a seed derived from
    `seed`), at most `restarts` times; `result.restarts` and `result.init_noise` say what was
    used. When no start gives a gradient the result's status is "failed" and its message
    says why: the images are the blank start, not a visualization. Same seed, same images.
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
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
        raise WorkbenchError(f"restarts must be a whole number >= 0, got {restarts!r}")
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
    if init_noise is not None:
        init_noise = check_init_noise(init_noise)
        if init is None:
            param = with_init_noise(param, init_noise)
    base_noise = (init_noise or 0.0) if init is not None else init_noise_of(param)
    tf = default_transforms(pre.height, pre.width) if transforms is None else transforms
    snap_steps = {int(s) for s in snapshots}
    start = time.perf_counter()

    recorder = objective_recorder(handle, objective)
    warnings: list[str] = []
    with frozen(handle.model), recorder:
        bar = progress_bar(total=steps, desc=f"featvis {objective.name}"[:60], enabled=progress, unit="step", leave=False)
        try:
            attempt, noise, first_dead = 0, base_noise, None
            while True:
                g = torch.Generator().manual_seed(_attempt_seed(seed, attempt))
                p_k, init_k = param, init
                if init is not None and noise:
                    init_k = _noisy_init(init, noise, batch, g)
                elif attempt > 0 and init is None and noise is not None:
                    p_k = with_init_noise(param, noise)
                run = _optimize(handle, objective, recorder, p_k, init_k, g, batch=batch, steps=steps, lr=lr, tf=tf,
                                snap_steps=snap_steps, callback=callback, bar=bar)
                if not run.dead:
                    break
                first_dead = first_dead or (run.dead, run.dead_values)
                if attempt == restarts:
                    break
                attempt += 1
                noise = None if base_noise is None else _restart_noise(base_noise, attempt)
                bar.reset()
        finally:
            bar.close()
        status, message = run.status, run.message
        if first_dead is not None:
            items, values = first_dead
            what = "objective exactly 0" if not any(values) else f"objective {values}"
            who = f"batch item(s) {items} " if batch > 1 else ""
            if run.dead:
                last = f", last start noise {noise:g}" if noise is not None else ""
                message = (f"{objective.name}: no start gave {who}a gradient ({what} in the first "
                           f"{min(steps, DEAD_START_STEPS)} steps of each of {attempt + 1} start(s){last}); the unit "
                           "does not fire on these images (try a larger init noise, another parameterization or site)")
            else:
                how = f"more noise (start noise {noise:g})" if noise is not None else "a new seed"
                warnings.append(f"the start gave {who}no gradient ({what}); restarted {attempt} time(s) from {how}")
        with torch.no_grad():
            final = run.image_fn().detach() if status != "diverged" else run.last_good
            if not bool(torch.isfinite(final).all()):
                final = run.last_good
                if status == "completed":
                    status, message = "diverged", "the last step made the image non-finite; kept the previous image"
            if status == "diverged":
                log.warning("featvis diverged: %s", message)
            images = lo + (hi - lo) * final
            activation = forward_objective(handle, objective, final, images, recorder=recorder).tolist()
            flat = final.flatten(1).std(1) < 1e-3
            blank = [i for i in range(batch) if bool(flat[i]) and activation[i] == 0]
            if status == "completed" and blank:
                status, message = "failed", (f"{objective.name}: batch item(s) {blank} ended as flat images with objective "
                                             "exactly 0; nothing was found")
            elif bool(flat.any()) and status != "failed":
                warnings.append(f"{int(flat.sum())} of {batch} images are flat (no structure); the objective may be "
                                "dead at this site or the learning rate too small")
            scene = snapped = scenes = None
            image_fn = run.image_fn
            if hasattr(image_fn, "describe"):
                scene = image_fn.describe()  # type: ignore[attr-defined]
                snapped = (lo + (hi - lo) * image_fn.snapped()).cpu()  # type: ignore[attr-defined]
                scenes = image_fn.scene(hard=True)  # type: ignore[attr-defined]
    return FeatureVisualization(
        images=images.cpu(), unit_images=final.cpu(), loss_trace=run.trace, snapshots=run.snaps, status=status,
        steps=run.done, objective=objective.name, input_range=(lo, hi), seed=int(seed), param=type(param).__name__,
        message=message, warnings=warnings, activation=[round(float(a), 6) for a in activation], scene=scene,
        snapped_images=snapped, seconds=time.perf_counter() - start, scenes=scenes, restarts=attempt,
        init_noise=None if noise is None else round(float(noise), 6),
    )
