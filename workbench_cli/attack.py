"""`workbench attack METHOD MODEL ...`: run an adversary generator, save its examples, grid and metrics.

    workbench attack pgd zoo:shapesnet --source square --target star --n 32 --out a/ --json
    workbench attack feature-level zoo:shapesnet --source circle --target hexagon --set steps=100
    workbench attack scene-search zoo:shapesnet --source star --target cross --json
    workbench attack adversarial-filtering zoo:shapesnet --set color_mode=uniform --out af/
    workbench attack text-trigger zoo:factgpt --n 20 --out tt/ --json
    workbench attack pgd ./my-model --inputs images.safetensors --set eps=0.01

METHOD is any name in the `adversaries` registry; its config dataclass is built from
`--set FIELD=VALUE` (repeatable; values parsed by the field's type; `none` for None,
comma-separated for tuples). Output folder `--out` (default `attack-METHOD`):
`examples.safetensors` + `examples.json` (AdversarialExamples.save), `grid.png`
(originals, adversarial images, amplified perturbation or the patch) and `metrics.json`
(what `--json` prints).

Inputs: `--inputs FILE.safetensors` (tensors `images` (N, C, H, W) in the model's input
range and optional `labels`), or, for a ShapesWorld model (zoo:shapesnet), `--n` scenes of
the `--source` class drawn with `--seed` and kept only when classified correctly (the
copy/paste protocol's rule); methods that sample scenes themselves (adversarial-filtering,
and snafue without --target) get none. `--target` is a class name or index (omit it for
an untargeted attack).

Protocols (`PROTOCOLS`): copy-paste and text-trigger draw their own inputs and report their
own metrics instead of the generic path. copy-paste takes `--inputs`, or `--n` ShapesWorld
scenes of `--source` (default: every class but `--target`) without context objects, runs
the Activation Atlas protocol and writes the examples, `grid.png` and `patch.png`, reporting
success_consistent, success_best, control_noise, control_natural and n_attempts.
text-trigger draws `--n` prompts of one FactWorld relation (`--source`) toward an object of
it (`--target`, default the rarest). Their metrics go to `out/metrics.json` too.

Nested config groups are set with dotted names: `--set design.featvis_steps=64 --set
sweep.grid=4` (copy-paste's `design` and `sweep`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench_cli.checks import new_folder, positive_int, seed_int
from workbench_cli.settings import build_config

log = logging.getLogger(__name__)

SELF_SAMPLING = ("adversarial-filtering",)
SCENE_INPUTS = ("feature-level", "scene-search")
"""Methods that take the ShapesWorld scenes themselves (they edit scene parameters, not pixels)."""


# --- inputs -------------------------------------------------------------------------------

def _load_inputs(handle: Any, path: str) -> Any:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise WorkbenchError(f"--inputs {path}: no such file; expected a .safetensors file with an 'images' tensor")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WorkbenchError(f"--inputs {path} is not a readable safetensors file ({exc})") from None
    if "images" not in tensors:
        raise WorkbenchError(f"--inputs {path} has tensors {sorted(tensors)}; expected 'images' (and optionally 'labels')")
    images = tensors["images"].float()
    labels = tensors.get("labels")
    return (images, labels) if labels is not None else images


def _draw_inputs(handle: Any, args: argparse.Namespace, method: str) -> Any:
    """Source-class ShapesWorld scenes (correctly classified) for a ShapesWorld model, or --inputs."""
    if args.inputs:
        return _load_inputs(handle, args.inputs)
    if handle.kind != "image_classifier":
        raise WorkbenchError(f"{method} on {handle.spec}: give --inputs, or use a method with its own protocol for text models")
    if not isinstance(handle.info.get("world"), dict):
        raise WorkbenchError(f"{handle.spec} has no ShapesWorld to draw images from; pass --inputs images.safetensors "
                             "(tensor 'images' in the model's input range, optional 'labels')")
    if method in SELF_SAMPLING or (method == "snafue" and args.target is None):
        return None
    from adversaries.feature_level import source_scenes
    from workbench.classifier import class_name, render_for, resolve_class

    tgt = resolve_class(handle, args.target) if args.target is not None else None
    src = args.source
    if src is None:
        src = next(c for c in range(len(handle.preprocess.class_names)) if c != tgt)
    sample = source_scenes(handle, src, args.n, seed=args.seed)
    log.info("drew %d correctly classified %s scenes", args.n, class_name(handle, resolve_class(handle, src) or 0))
    if method in SCENE_INPUTS:
        return sample
    return render_for(handle, sample), sample.labels


# --- grid ---------------------------------------------------------------------------------

def save_grid(handle: Any, ae: Any, path: Path, *, k: int = 8) -> Path | None:
    """Originals, adversarial images and the perturbation (amplified) or the patch, as one PNG."""
    import torch

    from workbench.classifier import class_name, to_unit

    if not isinstance(ae.inputs, torch.Tensor) or ae.inputs.ndim != 4 or len(ae) == 0:
        return None
    from workbench.plotting import pyplot, save_figure

    plt = pyplot()
    pre = handle.preprocess
    k = min(k, len(ae))
    rows = [("original", to_unit(pre, ae.inputs[:k]), ae.original_pred), ("adversarial", to_unit(pre, ae.adversarial[:k]), ae.adversarial_pred)]
    if isinstance(ae.perturbation, torch.Tensor) and ae.perturbation.numel():
        d = ae.perturbation[:k]
        scale = d.abs().flatten(1).amax(1).clamp_min(1e-8).view(-1, 1, 1, 1)
        rows.append(("perturbation (amplified)", (0.5 + 0.5 * d / scale).clamp(0, 1), None))
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.3 * (k + 1), 1.5 * len(rows)), squeeze=False)
    for r, (title, imgs, preds) in enumerate(rows):
        for c in range(k + 1):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == k:
                ax.axis("off")
                continue
            img = imgs[c]
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(img[:3].permute(1, 2, 0).numpy(), interpolation="nearest")
            if preds is not None:
                ax.set_xlabel(class_name(handle, int(preds[c])), fontsize=6, labelpad=1)
        axes[r][0].set_title(title, fontsize=7, loc="left")
    if isinstance(ae.patch, torch.Tensor) and ae.patch.ndim == 3:
        ax = axes[0][k]
        ax.axis("on")
        p = to_unit(pre, ae.patch[None])[0]
        ax.imshow(p[0].numpy() if p.shape[0] == 1 else p[:3].permute(1, 2, 0).numpy(),
                  cmap="gray" if p.shape[0] == 1 else None, interpolation="nearest")
        ax.set_title("patch", fontsize=7)
    desc = ae.extra.get("description") or ae.extra.get("best_description")
    fig.suptitle(f"{ae.method}: success {ae.success_rate:.2f}" + (f" | {desc}" if desc else ""), fontsize=7)
    fig.tight_layout(pad=0.3)

    save_figure(fig, path, dpi=110)
    return path


# --- protocols with their own inputs --------------------------------------------------------

def _copy_paste(config: Any, handle: Any, args: argparse.Namespace) -> dict[str, Any]:
    """copy-paste: the Activation Atlas protocol on `--inputs` or on drawn ShapesWorld scenes."""
    import torch

    from workbench.classifier import resolve_class

    if args.target is None:
        raise WorkbenchError("copy-paste needs --target CLASS (a class name or index)")
    t = resolve_class(handle, args.target)
    if args.inputs:
        inputs = _load_inputs(handle, args.inputs)
    else:
        if handle.info.get("world") is None:
            raise WorkbenchError("copy-paste on this model needs --inputs FILE.safetensors (images, optional labels); "
                                 "only ShapesWorld models can draw their own source images")
        from workbench.zoo.shapesnet import world_of

        world = world_of(handle)
        classes = [c for c in world.classes if c != world.classes[t]] if not args.source else [str(args.source)]
        for c in classes:
            world.class_index(c)
        g = torch.Generator().manual_seed(args.seed + 1000)
        sample = world.sample(max(args.n, 8), generator=g, classes=classes, context_mode="none")
        inputs = (world.render(sample), sample.labels)
    ex = config.generate(handle, inputs, t, progress=True)
    from workbench.featvis import save_image_grid

    rng = handle.preprocess.input_range
    ex.save(args.out)
    k = min(8, len(ex))
    if k:
        save_image_grid(torch.cat([ex.inputs[:k], ex.adversarial[:k]]), Path(args.out) / "grid.png", ncol=k,
                        input_range=rng)
    save_image_grid(ex.patch[None], Path(args.out) / "patch.png", input_range=rng)
    result = dict(ex.extra)
    result["out"] = args.out
    return result


def _text_trigger(config: Any, handle: Any, args: argparse.Namespace) -> dict[str, Any]:
    """text-trigger: `--n` prompts of one FactWorld relation (`--source`, default the first) whose true
    answer is another object than `--target` (default: the object fewest subjects have)."""
    import torch

    world = handle.info.get("world")
    if world is None or not hasattr(world, "relations"):
        raise WorkbenchError(f"{handle.spec} carries no FactWorld; pass prompts through the Python API "
                             "(TextTrigger().generate(handle, prompts, target))")
    rel = world.relation(args.source) if args.source else world.relations[0]
    facts = [f for f in world.facts if f.relation_id == rel.relation_id]
    target = args.target
    if target is None:
        counts = {o: sum(f.object == o for f in facts) for o in rel.objects}
        target = min(rel.objects, key=lambda o: (counts[o], o))
    elif target not in rel.objects:
        raise WorkbenchError(f"--target {target!r} is not an object of relation {rel.relation_id!r}; "
                             f"objects: {', '.join(rel.objects)}")
    facts = [f for f in facts if f.object != target]  # only facts whose answer must change
    g = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(facts), generator=g)[: max(1, args.n)].tolist()
    chosen = [facts[i] for i in sorted(pick)]
    prompts = [rel.templates[0].format(f.subject) for f in chosen]
    ae = config.generate(handle, prompts, target)
    ae.save(args.out)
    out = ae.summary()
    out.pop("config", None)
    out.update({"relation": rel.relation_id, "prompts": prompts[:5]})
    return out


PROTOCOLS: dict[str, Callable[[Any, Any, argparse.Namespace], dict[str, Any]]] = {
    "copy-paste": _copy_paste,
    "text-trigger": _text_trigger,
}
"""Methods the CLI runs by their own protocol: (config, handle, args) -> JSON-ready metrics."""


# --- command ------------------------------------------------------------------------------

def _attack(args: argparse.Namespace) -> None:
    import adversaries
    from workbench.models import load
    from workbench.storage import atomic_write_json

    cls = adversaries.get(args.method)
    config = build_config(cls, args.set)
    out = new_folder(args.out or f"attack-{args.method}", "--out")
    assert out is not None
    args.out = str(out)
    handle = load(args.model, device=args.device, progress=False)
    protocol = PROTOCOLS.get(args.method)
    if protocol is not None:
        result = dict(protocol(config, handle, args))
        out.mkdir(parents=True, exist_ok=True)
    else:
        inputs = _draw_inputs(handle, args, args.method)
        target: Any = args.target
        if handle.kind == "image_classifier" and target is not None:
            from workbench.classifier import resolve_class

            target = resolve_class(handle, target)
        ae = config.generate(handle, inputs, target)
        ae.save(out)
        grid = save_grid(handle, ae, out / "grid.png")
        result = ae.summary()
        result.pop("config", None)
        result["grid"] = str(grid) if grid else None
    result.update({"method": args.method, "model": args.model, "out": str(out)})
    atomic_write_json(out / "metrics.json", result)

    def text(r: dict[str, Any]) -> str:
        lines = [f"{r['method']} on {r['model']}: success {r.get('success_rate', float('nan')):.3f} "
                 f"({r.get('n_success', '?')} of {r.get('n', '?')})" if "success_rate" in r else f"{r['method']} on {r['model']}"]
        for key in ("description", "best_description", "trigger", "control_random_object", "control_random_word", "control_noise",
                    "control_success", "baseline", "baseline_success", "n_confident_wrong", "accuracy"):
            if r.get(key) is not None:
                lines.append(f"  {key}: {r[key]}")
        for row in (r.get("over_represented") or [])[:5]:
            lines.append(f"  over-represented: {row['feature']} (lift {row['lift']}, {row['n_failures_with']} failures)")
        lines.append(f"  wrote {r['out']}")
        return "\n".join(lines)

    args.emit(args, result, text)


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], emit: Callable[..., None]) -> None:
    p = sub.add_parser("attack", help="run an adversary generator: examples, grid PNG and metrics JSON")
    p.add_argument("method", help="adversary name (pgd, adversarial-patch, adversarial-filtering, snafue, "
                                  "feature-level, scene-search, text-trigger, copy-paste, ...)")
    p.add_argument("model", help="zoo:shapesnet, zoo:factgpt, minilm, a local Hugging Face folder or a hub name")
    p.add_argument("--source", default=None, help="source class of the drawn images (ShapesWorld models) or the protocol's source")
    p.add_argument("--target", default=None, help="target class name or index (omit for untargeted)")
    p.add_argument("--n", type=positive_int, default=32, help="number of inputs to draw (default 32)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed for drawing inputs (the config has its own seed)")
    p.add_argument("--inputs", default=None, help="safetensors file with 'images' (and optional 'labels')")
    p.add_argument("--out", default=None, help="output folder (default attack-METHOD)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="config field override (repeatable; GROUP.FIELD=VALUE in a nested group, "
                        "e.g. design.featvis_steps=64)")
    common(p)
    p.set_defaults(func=_attack, emit=emit)
