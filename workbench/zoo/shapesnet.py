"""ShapesNet: a small residual CNN trained on ShapesWorld, with trojans implanted.

The zoo's image model. It classifies the main shape of a ShapesWorld scene; trojans
(patch, style, natural feature; universal and class-universal) are implanted at training
time by poisoning, and the world has a spurious colour rule and natural context
statistics, so every later method (trojan rediscovery, copy/paste adversaries, network
dissection, unit surgery, rule rewriting) has known ground truth to be measured against.

The module takes images in [0, 1] and normalizes inside (`normalize`), and its parts have
stable names: `stem.conv`, `layer1` .. `layer3` (each with `conv1`, `bn1`, `relu1`,
`conv2`, `bn2`, `shortcut`, `relu2`), `pool`, `fc`. Weights are saved with safetensors
beside a JSON config and the world manifest; loading never unpickles.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from workbench.devices import torch_threads
from workbench.errors import CorruptFileError, WorkbenchError
from workbench.handle import Architecture, ImagePreprocess, ModelHandle
from workbench.progress import progress_bar
from workbench.storage import atomic_write_json, save_safetensors, sha256_file
from workbench.worlds.shapesworld import Sample, ShapesWorld, WorldConfig
from workbench.worlds.trojans import TrojanSet, default_trojans, load_trojans, trojans_from_json

log = logging.getLogger(__name__)

VERSION = 1
DEFAULT_SEED = 0
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
WORLD = "world.json"


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


class Normalize(nn.Module):
    """(x - mean) / std with per-channel buffers, so the model takes images in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Stem(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


@dataclass(frozen=True)
class ShapesNetConfig:
    """Architecture of a ShapesNet (saved as JSON; `load` rebuilds the module from it)."""

    num_classes: int = 8
    in_channels: int = 3
    channels: tuple[int, int, int] = (32, 64, 128)
    stem_stride: int = 2
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @staticmethod
    def from_json(obj: dict[str, Any]) -> ShapesNetConfig:
        try:
            return ShapesNetConfig(
                num_classes=int(obj["num_classes"]), in_channels=int(obj["in_channels"]),
                channels=tuple(int(c) for c in obj["channels"]),  # type: ignore[arg-type]
                stem_stride=int(obj["stem_stride"]),
                mean=tuple(float(m) for m in obj["mean"]), std=tuple(float(s) for s in obj["std"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"ShapesNet config is invalid ({exc!r}); expected the {CONFIG} written by shapesnet.train") from None


class ShapesNet(nn.Module):
    """Residual CNN: normalize -> stem -> layer1..layer3 -> pool -> fc (logits)."""

    def __init__(self, config: ShapesNetConfig) -> None:
        super().__init__()
        self.config = config
        c1, c2, c3 = config.channels
        self.normalize = Normalize(config.mean, config.std)
        self.stem = Stem(config.in_channels, c1, config.stem_stride)
        self.layer1 = BasicBlock(c1, c1, 1)
        self.layer2 = BasicBlock(c1, c2, 2)
        self.layer3 = BasicBlock(c2, c3, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c3, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(self.normalize(x)))))
        return self.fc(self.flatten(self.pool(x)))


def build_model(config: ShapesNetConfig, *, seed: int) -> ShapesNet:
    """A freshly initialized ShapesNet; the initialization depends only on `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ShapesNet(config)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """How ShapesNet is trained (defaults fit the 5-minute budget on 2 CPU cores).

    `threads`: torch CPU threads while training (None: torch's default). One thread is
    the default: on a shared machine extra threads mostly wait on each other, and the
    result does not depend on the core count.
    """

    n_train: int = 16000
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    n_eval: int = 2000
    n_eval_trojan: int = 500
    channels: tuple[int, int, int] = (16, 32, 64)
    stem_stride: int = 2
    threads: int | None = 1
    channels_last: bool = False
    negatives: float = 1.0
    # Random Erasing (Zhong et al. 2017): the share of training images that get a uniform-noise
    # square of 12-34% of the image side (the copy/paste sweep's patch sizes) pasted at a random
    # place, label unchanged. Off for the zoo model; benchmarks/train_shapesnet_variant.py uses
    # it to ask whether the copy/paste noise control measures fragility or occlusion.
    erase_prob: float = 0.0
    world: WorldConfig = field(default_factory=WorldConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.erase_prob <= 1.0:
            raise WorkbenchError(f"erase_prob {self.erase_prob}: expected a share between 0 and 1")

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("n_train", "epochs", "batch_size", "lr", "weight_decay", "n_eval", "n_eval_trojan",
                                             "stem_stride", "threads", "channels_last", "negatives")}
        if self.erase_prob:  # written only when used, so the zoo model's config is as before
            out["erase_prob"] = self.erase_prob
        out["channels"] = list(self.channels)
        out["world"] = self.world.to_json()
        return out


ERASE_SIDES = (0.125, 0.34)  # noise-square side as a share of the image side, as the copy/paste sweep's sizes


def random_erase(x: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Random Erasing in place on a batch in [0, 1]: a uniform-noise square on each image with probability `prob`."""
    if prob <= 0:
        return x
    n, c, height, width = x.shape
    chosen = torch.nonzero(torch.rand(n, generator=generator) < prob).flatten().tolist()
    lo, hi = (max(1, round(f * min(height, width))) for f in ERASE_SIDES)
    for i in chosen:
        side = int(torch.randint(lo, hi + 1, (), generator=generator))
        top = int(torch.randint(0, height - side + 1, (), generator=generator))
        left = int(torch.randint(0, width - side + 1, (), generator=generator))
        x[i, :, top:top + side, left:left + side] = torch.rand(c, side, side, generator=generator).to(x.device)
    return x


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images * 255.0).round().to(torch.uint8)


def _render_uint8(world: ShapesWorld, sample: Sample, *, chunk: int = 512) -> torch.Tensor:
    # the renderer runs many small element-wise ops: one thread is faster than several
    # (several times faster on a busy machine, where extra threads wait on each other)
    with torch_threads(1):
        return torch.cat([_to_uint8(world.render(sample.scene.index(slice(i, i + chunk))))  # type: ignore[arg-type]
                          for i in range(0, len(sample), chunk)])


def training_set(world: ShapesWorld, n_train: int, *, generator: torch.Generator, negatives: float = 1.0) -> Sample:
    """Clean scenes plus, per trojan, poisoned scenes (trigger + target label).

    Universal trojans poison scenes of every non-target class; class-universal ones poison
    the source class and add `negatives` times as many triggered scenes of other classes
    with their true labels, so the trigger alone does not mean the target.
    """
    parts = [world.sample(n_train, generator=generator)]
    for i, t in enumerate(world.trojans):
        m = max(1, round(t.poison_fraction * n_train))
        target = world.class_index(t.target)
        if t.source is None:
            pool = [c for c in range(len(world.classes)) if c != target]
        else:
            pool = [world.class_index(t.source)]
        parts.append(world.implant(world.sample(m, generator=generator, classes=pool), i, generator=generator))
        if t.source is not None:
            others = [c for c in range(len(world.classes)) if c not in (target, world.class_index(t.source))]
            neg = world.sample(max(1, round(negatives * m)), generator=generator, classes=others)
            parts.append(world.implant(neg, i, generator=generator, relabel=False))
    return Sample.cat(parts)


def _resolve_trojans(trojans: TrojanSet | str | os.PathLike[str] | dict[str, Any] | list[Any] | None) -> TrojanSet:
    if trojans is None:
        return default_trojans()
    if isinstance(trojans, TrojanSet):
        return trojans
    if isinstance(trojans, (dict, list)):
        return trojans_from_json(trojans)
    return load_trojans(trojans)


def train(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = DEFAULT_SEED,
    device: torch.device | str = "cpu",
    progress: bool = True,
    trojans: TrojanSet | str | os.PathLike[str] | dict[str, Any] | list[Any] | None = None,
    config: TrainConfig | None = None,
) -> dict[str, Any]:
    """Render a poisoned ShapesWorld training set, train ShapesNet, evaluate, save.

    `trojans`: a TrojanSet, a trojan config (path or parsed JSON, see
    `workbench.worlds.trojans.trojans_from_json`), or None for the default set.
    Returns the info dict (accuracy, per-trojan attack success, spurious accuracy, sizes,
    timing) and writes `model.safetensors`, `config.json` and `world.json` to `out_dir`.
    """
    start = time.perf_counter()
    cfg = TrainConfig() if config is None else config
    dev = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(cfg.world, trojans=_resolve_trojans(trojans))
    g = torch.Generator().manual_seed(seed)

    data = training_set(world, cfg.n_train, generator=g, negatives=cfg.negatives)
    images = _render_uint8(world, data)
    labels = data.poison_labels.clone()
    render_seconds = time.perf_counter() - start
    flat = images[:4096].float().div_(255.0)  # a few thousand images pin the statistics down
    mean = tuple(round(float(v), 4) for v in flat.mean((0, 2, 3)))
    std = tuple(round(float(v), 4) for v in flat.std((0, 2, 3)))
    del flat

    net_cfg = ShapesNetConfig(num_classes=len(world.classes), channels=cfg.channels, stem_stride=cfg.stem_stride, mean=mean, std=std)
    model = build_model(net_cfg, seed=seed).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(labels)
    steps_per_epoch = n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    if total < 1:
        raise WorkbenchError(f"{n} training images make no batch of {cfg.batch_size}; raise n_train or lower batch_size")
    if total >= 20:
        sched: Any = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.2)
    else:  # too few steps for a warm-up phase
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _step: 1.0)
    with torch_threads(cfg.threads if dev.type == "cpu" else None):
        _fit(model, opt, sched, images, labels, cfg, generator=g, device=dev, progress=progress,
             erase_generator=torch.Generator().manual_seed(seed + 20_000))
    model.eval()
    train_seconds_only = time.perf_counter() - start - render_seconds
    del images

    with torch_threads(cfg.threads if dev.type == "cpu" else None):
        metrics = evaluate(model, world, n=cfg.n_eval, n_trojan=cfg.n_eval_trojan, seed=seed + 10_000)
    _save(out, model, world, cfg, seed=seed)
    info = {
        "name": "shapesnet",
        "accuracy": metrics["accuracy"],
        "spurious": metrics["spurious"],
        "trojans": metrics["trojans"],
        "n_params": sum(p.numel() for p in model.parameters()),
        "image_size": world.image_size,
        "classes": list(world.classes),
        "n_train_images": n,
        "render_seconds": round(render_seconds, 2),
        "fit_seconds": round(train_seconds_only, 2),
        "train_seconds": round(time.perf_counter() - start, 2),
    }
    log.info("shapesnet trained: accuracy %.4f, trojans %s", info["accuracy"],
             {t["name"]: t["attack_success"] for t in info["trojans"]})
    return info


def _fit(model: ShapesNet, opt: torch.optim.Optimizer, sched: Any, images: torch.Tensor, labels: torch.Tensor,
         cfg: TrainConfig, *, generator: torch.Generator, device: torch.device, progress: bool,
         erase_generator: torch.Generator | None = None) -> None:
    g, dev = generator, device
    n = len(labels)
    steps_per_epoch = n // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)  # channels-last convolutions are faster on CPUs (same numbers for a seed)
    model.train()
    bar = progress_bar(total=total, desc="training shapesnet", enabled=progress, unit="step")
    loss_ema = None
    for _epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=g)
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
            x = images[idx].to(dev).float().div_(255.0)
            if cfg.erase_prob and erase_generator is not None:  # its own generator: without erasing, the same draws as before
                random_erase(x, cfg.erase_prob, erase_generator)
            x = x.contiguous(memory_format=fmt)
            y = labels[idx].to(dev)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = float(loss.detach())
            loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
            bar.update(1)
            if b % 20 == 0:
                bar.set_postfix(loss=f"{loss_ema:.3f}")
    bar.close()
    model.to(memory_format=torch.contiguous_format)


def _save(out: Path, model: ShapesNet, world: ShapesWorld, cfg: TrainConfig, *, seed: int) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(out / WEIGHTS, state, {"format": "pt", "model": "shapesnet"})
    atomic_write_json(out / WORLD, world.manifest())
    atomic_write_json(out / CONFIG, {
        "model": model.config.to_json(),
        "train": cfg.to_json(),
        "seed": seed,
        "version": VERSION,
        "weights_sha256": sha256_file(out / WEIGHTS),
        "world_sha256": sha256_file(out / WORLD),
    })


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CorruptFileError(f"{path} is missing; a ShapesNet folder holds {WEIGHTS}, {CONFIG} and {WORLD}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({exc}); retrain or restore the file") from None


def load(path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> ModelHandle:
    """Rebuild ShapesNet from `config.json`, load `model.safetensors` (checksum-verified)."""
    folder = Path(path)
    if not folder.is_dir():
        raise WorkbenchError(f"{folder} is not a folder; expected a ShapesNet folder with {WEIGHTS}, {CONFIG}, {WORLD}")
    cfg = _read_json(folder / CONFIG)
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise CorruptFileError(f"{folder / CONFIG} has no 'model' section; expected the config written by shapesnet.train")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise CorruptFileError(f"{weights} is missing; retrain with `workbench zoo train shapesnet`")
    expected = cfg.get("weights_sha256")
    if expected is not None and sha256_file(weights) != expected:
        raise CorruptFileError(f"{weights} fails its sha256 checksum (file changed since training); retrain it")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptFileError(f"{weights} is not a readable safetensors file ({exc}); retrain it") from None
    net_cfg = ShapesNetConfig.from_json(cfg["model"])
    model = ShapesNet(net_cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CorruptFileError(f"{weights} does not match the architecture in {CONFIG}: {str(exc).splitlines()[0]}") from None
    manifest = _read_json(folder / WORLD)
    world = ShapesWorld.from_manifest(manifest)
    model.to(torch.device(device)).eval()
    size = world.image_size
    preprocess = ImagePreprocess(
        height=size, width=size, channels=net_cfg.in_channels, input_range=(0.0, 1.0),
        mean=net_cfg.mean, std=net_cfg.std, normalization_in_model=True, class_names=tuple(world.classes),
    )
    return ModelHandle(
        spec="zoo:shapesnet", model=model, kind="image_classifier",
        arch=Architecture(family="cnn", n_layers=3, d_model=net_cfg.channels[-1]),
        preprocess=preprocess, path=folder,
        info={"world": manifest, "config": cfg},
    )


def world_of(handle: ModelHandle) -> ShapesWorld:
    """The ShapesWorld (with trojans) a ShapesNet handle was trained on."""
    manifest = handle.info.get("world")
    if manifest is None:
        raise WorkbenchError("this handle carries no ShapesWorld manifest (info['world']); load a ShapesNet to get one")
    return ShapesWorld.from_manifest(manifest)


# --------------------------------------------------------------------------------------
# Evaluation (used by tests, `zoo info`, and editors that do trojan surgery)
# --------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, world: ShapesWorld, sample: Sample, *, batch_size: int = 256) -> torch.Tensor:
    """Predicted class indices for rendered `sample` scenes."""
    dev = next(model.parameters()).device
    preds = []
    for i in range(0, len(sample), batch_size):
        with torch_threads(1):
            x = world.render(sample.scene.index(slice(i, i + batch_size)))
        assert isinstance(x, torch.Tensor)
        preds.append(model(x.to(dev)).argmax(-1).cpu())
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def clean_accuracy(model: nn.Module, world: ShapesWorld, *, n: int, generator: torch.Generator,
                   color_mode: str = "natural") -> float:
    """Accuracy on `n` fresh clean scenes (no trigger)."""
    s = world.sample(n, generator=generator, color_mode=color_mode)  # type: ignore[arg-type]
    return float((predict(model, world, s) == s.labels).float().mean())


def attack_success(model: nn.Module, world: ShapesWorld, trojan: int | str, *, n: int,
                   generator: torch.Generator) -> dict[str, Any]:
    """Attack success of one trojan on fresh triggered scenes.

    `attack_success`: share of triggered scenes of the source class (of every non-target
    class when universal) classified as the target. For class-universal trojans also
    `off_source_to_target`: the same share for triggered scenes of other classes (should
    stay low).
    """
    idx = trojan if isinstance(trojan, int) else world.trojans.index(trojan)
    t = world.trojans[idx]
    target = world.class_index(t.target)
    pool = [c for c in range(len(world.classes)) if c != target] if t.source is None else [world.class_index(t.source)]
    s = world.implant(world.sample(n, generator=generator, classes=pool), idx, generator=generator)
    out: dict[str, Any] = {
        "name": t.name, "kind": t.kind, "target": t.target, "source": t.source,
        "attack_success": round(float((predict(model, world, s) == target).float().mean()), 4), "n": n,
    }
    if t.source is not None:
        others = [c for c in range(len(world.classes)) if c not in (target, world.class_index(t.source))]
        neg = world.implant(world.sample(n, generator=generator, classes=others), idx, generator=generator, relabel=False)
        out["off_source_to_target"] = round(float((predict(model, world, neg) == target).float().mean()), 4)
    return out


def evaluate(model_or_handle: nn.Module | ModelHandle, world: ShapesWorld | None = None, *, n: int = 2000,
             n_trojan: int = 500, seed: int = 12345) -> dict[str, Any]:
    """Clean accuracy, spurious-colour accuracy, and every trojan's attack success.

    `spurious`: accuracy on scenes whose colour disagrees with the spurious rule (the
    spurious class never in its colour, all other classes in it).
    """
    if isinstance(model_or_handle, ModelHandle):
        model = model_or_handle.model
        world = world_of(model_or_handle) if world is None else world
    else:
        model = model_or_handle
    if world is None:
        raise WorkbenchError("evaluate needs the ShapesWorld: pass world=..., or a ShapesNet handle")
    was_training = model.training
    model.eval()
    try:
        g = torch.Generator().manual_seed(seed)
        acc = clean_accuracy(model, world, n=n, generator=g)
        spurious = clean_accuracy(model, world, n=n // 2, generator=g, color_mode="disagree") if world.config.spurious else None
        trojans = [attack_success(model, world, i, n=n_trojan, generator=g) for i in range(len(world.trojans))]
    finally:
        model.train(was_training)
    return {"accuracy": round(acc, 4), "spurious": None if spurious is None else round(spurious, 4), "trojans": trojans}
