"""Copy/paste attacks designed from interpretations, on ShapesNet, with the Activation Atlas protocol.

For every target class: source images are fresh ShapesWorld scenes of all other classes
(no context objects, so the patch is the only context), only those classified correctly
count; the patch is designed from the interpretation of the target (units at layer3 most
associated with it -> feature visualizations at patch size through the scene parameters,
feature visualizations of the same direction optimized while pasted on the calibration
images, and natural exemplar crops), chosen on a calibration split (ranked over a thinned
sweep), then swept over 6x6 positions x 6 sizes (6-16 px of 48; Mu & Andreas's sweep;
`--sweep atlas-v1` for the first version's 4x4 x 10/13/16 px) on the test split. Controls: a uniform-noise patch and a
random natural crop, same sizes and sweep, each the best of as many candidates as there were designs, ranked the same
way (`--controls single`: one of each, as in the Activation Atlas). Headline targets are the classes with natural
context features (star: yellow crescent, hexagon: orange half-disc, ring: navy/teal waves,
triangle: sand/olive stripes); square (spurious red colour) and the trojan targets are
reported separately, as is any design that turns out to be an implanted trigger.

    .venv/bin/python benchmarks/bench_copy_paste.py [--quick] [--json] [--targets star,ring] [--seed 0] [--sweep atlas-v1] [--model DIR]

Published anchor (Carter et al. 2019, InceptionV1): 37.2% consistent, 57.5% best placement;
target probability 5.3% -> 24.0% / 42.2%.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch


def describe(design: dict) -> str:
    d = design.get("description", {})
    if d.get("oracle"):
        return f"ground truth: {d['oracle']}"
    if design.get("source") == "featvis":
        sc = d.get("scene", {})
        objs = ", ".join(f"{o['color']} {o['shape']}" for o in sc.get("objects", []))
        bg = sc.get("background", {})
        back = "" if bg.get("texture") == "plain" and bg.get("colors") == ["grey", "grey"] else \
            f"{'/'.join(bg.get('colors', []))} {bg.get('texture')}"
        part = f" [{d['part']} part]" if d.get("part") else ""
        looks = d.get("resembles_trigger_of") or []
        like = f" (looks like the trigger of {', '.join(looks)})" if looks else ""
        return f"featvis: {objs or '(no object)'}{' on ' + back if back and objs else (' ' + back if back else '')}{part}{like}"
    shows = d.get("shows")
    if shows:
        share = shows["pixel_share"]
        parts = [f"{k} {v:.0%}" for k, v in share.items() if v >= 0.05]
        shapes = ", ".join(f"{k} {v:.0%}" for k, v in shows["shapes"].items())
        return (f"{design.get('source')} crop of a {shows['main_class']} scene ({', '.join(parts)}; shapes: "
                f"{shapes or 'none'}; {shows['texture']} background)")
    return f"{design.get('source')}: pool image {d.get('pool_index')} box {d.get('box')}"


def oracle_design(handle, world, target: str, side: int):
    """The world's own context feature of `target` as a patch (`side` px): an object on the plain
    background, or a square of the background texture. Not an interpretation: the ground truth
    the designs are trying to find, measured through the same protocol."""
    import torch.nn.functional as F

    from adversaries.placement_sweep import PatchDesign
    from workbench.worlds.scene import TEXTURES, color_rgb, empty_scene, render, texture_index

    rule = next(r for r in world.config.context if r.cls == target)
    scene = empty_scene(1)
    if rule.kind == "object":
        scene = scene.add_object(shape=rule.shape, center=torch.zeros(1, 2), size=0.7, color=rule.color)
        words = f"{rule.color} {rule.shape} (object)"
    else:
        scene = scene.replace(bg_weights=F.one_hot(torch.tensor([texture_index(rule.texture)]), len(TEXTURES)).float(),
                              bg_colors=torch.tensor([[color_rgb(c) for c in rule.colors]]), bg_freq=torch.tensor([4.5]))
        words = f"{'/'.join(rule.colors)} {rule.texture} (background)"
    patch = render(scene, height=side, width=side).images[0]
    return PatchDesign(patch, "oracle", {"oracle": words, "content": "context feature (ground truth)", "part": "whole"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer images and candidates (about 4x faster)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--targets", default=None, help="comma-separated target classes (default: all groups)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-strict", action="store_true", help="skip the context-features-only pass")
    ap.add_argument("--sweep", choices=("mu-andreas", "atlas-v1"), default="mu-andreas",
                    help="placements: 6x6 positions x 6 sizes (default, Mu & Andreas) or the first version's 4x4 x 3 sizes")
    ap.add_argument("--controls", choices=("best_of_n", "single"), default="best_of_n",
                    help="the controls' selection: the best of as many noise patches / crops as designs (default), "
                         "or one of each as in the Activation Atlas")
    ap.add_argument("--oracle", action="store_true",
                    help="instead of designing, paste each context class's ground-truth context feature (the world's own "
                         "rule, rendered at the largest patch size): what the protocol gives the true context feature")
    ap.add_argument("--model", default="zoo:shapesnet",
                    help="zoo:shapesnet, or a folder written by a ShapesNet training (workbench.zoo.shapesnet.train)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import workbench
    from adversaries.copy_paste import CopyPaste, DesignConfig
    from adversaries.placement_sweep import SweepConfig
    from workbench.zoo.shapesnet import world_of

    if args.model.startswith("zoo:"):
        h = workbench.load(args.model, device="cpu", progress=False)
    else:
        from workbench.zoo.shapesnet import load as load_shapesnet

        h = load_shapesnet(args.model)
    world = world_of(h)
    context = [r.cls for r in world.config.context]
    spurious = [world.config.spurious.cls] if world.config.spurious else []
    trojan_targets = sorted({t.target for t in world.trojans} - set(context) - set(spurious))
    groups = {t: "context" for t in context} | {t: "spurious colour" for t in spurious} | {t: "trojan target" for t in trojan_targets}
    targets = args.targets.split(",") if args.targets else list(groups)
    n = 160 if args.quick else 320
    design = DesignConfig(n_featvis=4 if args.quick else 6, n_featvis_context=4 if args.quick else 6,
                          n_exemplars=3 if args.quick else 4, featvis_steps=112 if args.quick else 160,
                          n_pool=512 if args.quick else 1024)
    # atlas-v1: the sweep of the first version, 4 x 4 positions x 3 sizes (10, 13, 16 px of 48)
    sweep = (SweepConfig(grid=4, sizes=(0.21, 0.27, 0.33), controls=args.controls) if args.sweep == "atlas-v1"
             else SweepConfig(controls=args.controls))
    cfg = CopyPaste(design=design, sweep=sweep, seed=args.seed)

    def row(res, tgt, seconds):
        return {
            "target": tgt, "group": groups.get(tgt, "other"), "feature_kind": res["feature_kind"],
            "content": res["content"], "trojan": res["design"]["trojan"], "design": describe(res["design"]),
            "canvas": res["design"]["description"].get("canvas"),
            "success_consistent": round(res["success_consistent"], 4), "success_best": round(res["success_best"], 4),
            "control_noise": round(res["control_noise"], 4), "control_natural": round(res["control_natural"], 4),
            "control_noise_consistent": round(res["control_noise_consistent"], 4),
            "p_target_before": round(res["p_target_before"], 4), "p_target_consistent": round(res["p_target_consistent"], 4),
            "p_target_best": round(res["p_target_best"], 4), "n_attempts": res["n_attempts"],
            "n_candidates": len(res["candidates"]), "n_placements": res["n_placements"],
            "successes_best": sum(v["successes"] for v in res["per_class"].values()),
            "per_class": {k: f"{v['successes']}/{v['attempts']}" for k, v in res["per_class"].items()},
            "target_coverage": res["design"]["target_coverage"], "seconds": round(seconds, 1),
        }

    def run(config, which, strict_which):
        """Every target once; the context-features-only pass reuses the same candidates (designed
        once on the same calibration split), measured with `context_only=True`."""
        rows, strict_rows = [], []
        for tgt in which:
            t0 = time.perf_counter()
            ti = world.class_index(tgt)
            g = torch.Generator().manual_seed(1000 + args.seed)
            s = world.sample(n, generator=g, classes=[c for c in world.classes if c != tgt], context_mode="none")
            images = world.render(s)
            if args.oracle:
                designs = ([oracle_design(h, world, tgt, max(config.sweep.sizes_px(h)))], {})
            else:
                designs = config.design_patches(h, ti, images[config.plan(h, images, s.labels, ti).calibration])
            res = config.run_protocol(h, images, s.labels, ti, class_names=world.classes, designs=designs)
            res.pop("_tensors")
            rows.append(row(res, tgt, time.perf_counter() - t0))
            if tgt in strict_which:
                t1 = time.perf_counter()
                strict_cfg = dataclasses.replace(config, design=dataclasses.replace(config.design, context_only=True))
                res = strict_cfg.run_protocol(h, images, s.labels, ti, class_names=world.classes, designs=designs)
                res.pop("_tensors")
                strict_rows.append(row(res, tgt, time.perf_counter() - t1))
        return rows, strict_rows

    def pooled(rows):
        head = [r for r in rows if r["group"] == "context" and r["feature_kind"] != "trojan trigger"]
        if not head:
            return {}
        att = sum(r["n_attempts"] for r in head)
        best = sum(r["successes_best"] for r in head) / att
        noise = sum(r["control_noise"] * r["n_attempts"] for r in head) / att
        cons = sum(r["success_consistent"] * r["n_attempts"] for r in head) / att
        return {"targets": [r["target"] for r in head], "n_attempts": att, "success_best": round(best, 4),
                "success_consistent": round(cons, 4), "control_noise": round(noise, 4),
                "ratio_to_noise": round(best / max(noise, 1e-9), 2),
                "meets_57_5": best >= 0.575, "meets_3x_noise": best >= 3 * noise}

    if args.oracle:
        targets = [t for t in targets if groups.get(t) == "context"]
    strict_targets = [] if args.no_strict or args.oracle else [t for t in targets if groups.get(t) == "context"]
    rows, strict_rows = run(cfg, targets, strict_targets)
    summary = pooled(rows)
    strict = pooled(strict_rows) if strict_rows else {}
    if args.json:
        print(json.dumps({"rows": rows, "context_summary": summary, "strict_rows": strict_rows,
                          "strict_context_summary": strict}, indent=2))
        return
    print(f"# copy/paste on ShapesNet ({'quick' if args.quick else 'full'}, seed {args.seed}): {n} source scenes per target, "
          f"{cfg.sweep.grid}x{cfg.sweep.grid} positions x {len(cfg.sweep.sizes)} sizes {cfg.sweep.sizes_px(h)} px")
    def table(rs, title):
        print(title)
        print(f"{'target':<9} {'group':<16} {'consist':>7} {'best':>6} {'noise':>6} {'natural':>7} {'p(t) before->cons/best':>24} {'n':>4}  design")
        for r in rs:
            tag = f" [TROJAN {r['trojan']}]" if r["trojan"] else ""
            print(f"{r['target']:<9} {r['group']:<16} {r['success_consistent']:>7.3f} {r['success_best']:>6.3f} "
                  f"{r['control_noise']:>6.3f} {r['control_natural']:>7.3f} "
                  f"{r['p_target_before']:>8.3f} -> {r['p_target_consistent']:.3f}/{r['p_target_best']:.3f} {r['n_attempts']:>4}  "
                  f"{r['content']}: {r['design']}{tag}")

    def verdict(sm, what):
        if sm:
            print(f"{what} ({', '.join(sm['targets'])}; pooled over {sm['n_attempts']} attempts): "
                  f"best {sm['success_best']:.3f}, consistent {sm['success_consistent']:.3f}, "
                  f"noise {sm['control_noise']:.3f} ({sm['ratio_to_noise']}x); target >= 0.575 and >= 3x noise: "
                  f"{'MET' if sm['meets_57_5'] and sm['meets_3x_noise'] else 'MISSED'}")

    table(rows, "## any non-trojan design (the headline: trojan triggers are reported apart)")
    verdict(summary, "context-class targets, non-trojan designs")
    if strict_rows:
        table(strict_rows, "## context features only (no class-shaped object, no crop of a main object)")
        verdict(strict, "context-class targets, context-feature designs only")
    print("per class (best placement, successes/attempts):")
    for r in rows:
        print(f"  {r['target']}: {r['per_class']}")


if __name__ == "__main__":
    main()
