"""`workbench featvis ...` and `workbench rediscover ...`.

    workbench featvis zoo:shapesnet --site layer2 --unit 5 --steps 256 --out fv/
    workbench featvis zoo:shapesnet --logit star --param scene --batch 4 --out fv-star/
    workbench rediscover zoo:shapesnet --out rd/ --json
    workbench rediscover zoo:shapesnet --trojans held_out.json --train --out rd-held-out/

`featvis` writes `grid.png`, `snapshots.png` (with --snapshots), `images.safetensors` and
`featvis.json`; Ctrl-C stops the optimization and still writes the current image (status
"interrupted"); when no start gives the unit a gradient (it never fires) it exits 2 and
writes nothing. `rediscover` writes `rediscovery.json`, `rediscovery.txt` (the table) and
one PNG of views per trojan and method; with --json it prints mean_score and per_trojan
({name, kind, method, score, attack_success}, ...), and model_accuracy. Scores are read beside
the model's clean accuracy and each trojan's attack success (in the table too): a trigger the
model barely learned is hard to rediscover. `--train` uses the zoo's recipe, `--quick-train` a
quicker, weaker one.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench_cli.checks import new_folder, seed_int


def _load_image_model(spec: str, device: str) -> Any:
    from workbench.models import load

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "world.json").is_file():  # a ShapesNet folder (e.g. trained on a held-out config)
        from workbench.devices import resolve_device
        from workbench.zoo.shapesnet import load as load_shapesnet

        return load_shapesnet(path, device=resolve_device(device))
    return load(spec, device=device, progress=False)


def _class(handle: Any, value: str) -> int:
    names = handle.preprocess.class_names if handle.preprocess is not None else ()
    if value.lstrip("-").isdigit():
        return int(value)
    if value not in names:
        raise WorkbenchError(f"unknown class {value!r}; classes: {', '.join(names) or '(unnamed: give an index)'}")
    return names.index(value)


def _snapshot_steps(text: str) -> tuple[int, ...]:
    """`--snapshots 0,64,256` as step numbers."""
    parts = [s.strip() for s in text.split(",") if s.strip()] if text else []
    bad = [s for s in parts if not s.isdigit()]
    if bad:
        raise WorkbenchError(f"--snapshots takes comma-separated step numbers >= 0, e.g. 0,64,256; got {text!r}")
    return tuple(int(s) for s in parts)


def _featvis(args: argparse.Namespace) -> None:
    from workbench import featvis as fv

    snaps = _snapshot_steps(args.snapshots)
    handle = _load_image_model(args.model, args.device)
    fv.render.require_image_model(handle)
    if args.logit is not None:
        if args.site is not None or args.unit is not None:
            raise WorkbenchError("give either --logit CLASS or --site/--unit, not both")
        objective = fv.class_logit(_class(handle, args.logit))
    else:
        if args.site is None or args.unit is None:
            sites = ", ".join(s["name"] for s in fv.activation_sites(handle))
            raise WorkbenchError(f"give --site and --unit (or --logit CLASS); sites of {args.model}: {sites}")
        if args.x is not None or args.y is not None:
            objective = fv.neuron(args.site, args.unit, args.x, args.y)
        else:
            objective = fv.channel(args.site, args.unit)
    if args.tv:
        objective = objective - args.tv * fv.total_variation()
    if args.diversity:
        if args.site is None:
            raise WorkbenchError("--diversity needs --site (it compares activations at that site)")
        objective = objective + args.diversity * fv.diversity(args.site)
    res = fv.visualize(handle, objective, param=fv.parse_param(args.param), steps=args.steps, lr=args.lr,
                       batch=args.batch, snapshots=snaps, seed=args.seed, progress=not args.json,
                       init_noise=args.init_noise)
    if res.failed:
        raise WorkbenchError(f"featvis found nothing: {res.message}")
    out = res.save(args.out)
    result = res.to_json()
    result.update({"model": args.model, "out": str(out), "grid": str(out / "grid.png")})
    result.pop("loss_trace", None)
    result["loss_first_last"] = [res.loss_trace[0], res.loss_trace[-1]] if res.loss_trace else None

    def text(r: dict[str, Any]) -> str:
        lines = [f"{r['objective']}: {r['status']} after {r['steps']} steps, activation {r['activation']}",
                 f"  wrote {r['out']} (grid.png, images.safetensors, featvis.json)"]
        if r.get("message"):
            lines.append(f"  {r['message']}")
        lines += [f"  warning: {w}" for w in r.get("warnings", [])]
        for i, sc in enumerate(r.get("scene") or []):
            objs = ", ".join(f"{o['color']} {o['shape']} at ({o['center'][0]:+.2f}, {o['center'][1]:+.2f})" for o in sc["objects"])
            bg = sc["background"]
            lines.append(f"  scene {i}: {objs or 'no object'} on {'/'.join(bg['colors'])} {bg['texture']}"
                         + (f", {sc['patch']['pattern']} patch" if sc.get("patch") else ""))
        return "\n".join(lines)

    args.emit(args, result, text)


def _rediscover(args: argparse.Namespace) -> None:
    from workbench_protocols import rediscovery as rd

    new_folder(args.out, "--out")
    trojans = None
    if args.trojans:
        from workbench.worlds.trojans import load_trojans

        trojans = load_trojans(args.trojans)
    if args.quick_train and not args.train:
        raise WorkbenchError("--quick-train applies with --train (it picks the quick recipe for the model trained first)")
    if args.train:
        if trojans is None:
            raise WorkbenchError("--train needs --trojans CONFIG (the held-out set to implant)")
        handle = rd.model_for_trojans(trojans, seed=args.seed, cache=args.cache, quick=args.quick_train,
                                      progress=not args.json)
    else:
        handle = _load_image_model(args.model, args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    out = Path(args.out)
    res = rd.rediscover(handle, trojans=trojans, methods=methods, budget=args.budget, seed=args.seed,
                        progress=not args.json, views_dir=out / "views")
    res.save(out)
    result = res.to_json()
    result.update({"model": args.model, "trojans": args.trojans, "out": str(out), "budget": args.budget})
    args.emit(args, result, lambda r: res.table() + f"\nwrote {r['out']}")


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], emit: Callable[..., None]) -> None:
    p = sub.add_parser("featvis", help="feature visualization of a unit or class logit: images + JSON")
    p.add_argument("model", help="zoo:shapesnet, a ShapesNet folder, or another image model spec")
    p.add_argument("--site", default=None, help="activation site (a module name; see `workbench sites MODEL`)")
    p.add_argument("--unit", type=int, default=None, help="channel index at --site")
    p.add_argument("--x", type=int, default=None, help="neuron column at --site (default: the whole channel)")
    p.add_argument("--y", type=int, default=None, help="neuron row at --site")
    p.add_argument("--logit", default=None, help="visualize a class logit instead (class name or index)")
    p.add_argument("--param", default="fourier", help="fourier (default), pixels, or scene (ShapesWorld scene parameters)")
    p.add_argument("--steps", type=int, default=512)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tv", type=float, default=0.0, help="total-variation penalty weight")
    p.add_argument("--diversity", type=float, default=0.0, help="diversity weight (needs --batch >= 2)")
    p.add_argument("--snapshots", default="", help="comma-separated steps to keep, e.g. 0,64,256")
    p.add_argument("--init-noise", type=float, default=None,
                   help="start noise (std before the sigmoid; fourier and pixels; default 0.3); a start that gives "
                        "the unit no gradient is retried with more")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="featvis-out", help="output folder")
    common(p)
    p.set_defaults(func=_featvis, emit=emit)

    p = sub.add_parser("rediscover", help="trojan rediscovery: 8-way multiple choice per trojan and method")
    p.add_argument("model", help="zoo:shapesnet or a ShapesNet folder trained with --trojans")
    p.add_argument("--trojans", default=None, help="trojan config JSON (a held-out set); default: the model's own")
    p.add_argument("--train", action="store_true", help="train (and cache) a ShapesNet with --trojans first, "
                                                        "with the zoo's recipe")
    p.add_argument("--quick-train", action="store_true",
                   help="with --train: the quick recipe (6,000 images, 4 epochs; a weaker model, minutes faster)")
    p.add_argument("--methods", default=None, help="comma-separated subset of: featvis-logit, featvis-logit-fourier, "
                                                    "copy-paste, feature-level, natural, scene-search, adversarial-filtering, adversarial-patch")
    p.add_argument("--budget", default="quick", choices=("tiny", "quick", "full"), help="optimization budget per method")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--out", default="rediscovery-out", help="output folder")
    common(p)
    p.set_defaults(func=_rediscover, emit=emit)
