"""`workbench das`: where a model represents a variable of its world, by distributed alignment search.

    workbench das zoo:factgpt --variable subject --site blocks.0.hook_resid_post --dim 8 --out das/ --json
    workbench das zoo:factgpt --variable relation --site blocks.1.hook_resid_post --position last --out das-rel/
    workbench das zoo:shapesnet --variable shape --site layer3 --dim 8 --sae sae-layer3/ --out das-shape/

DAS learns a rotation whose first `--dim` coordinates, swapped from a source input into a base
input, make the model give the counterfactual answer; the same swap along a probe's, LEACE's,
difference-in-means', an SAE's (`--sae`), single units' and random directions are the baselines. The output is
each method's interchange-intervention accuracy (IIA) on held-out pairs with a bootstrap
interval; `--out` gets `das.json` and `das.png`. Bad input (a variable the model's world lacks,
an unknown site, a dimension outside 1..width, a dictionary of another model or site, an
existing --out) exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench_cli.checks import finite_float, new_folder, positive_int, seed_int, threads

VARIABLES = ("subject", "relation", "shape", "colour")


def _das(args: argparse.Namespace) -> None:
    import torch

    from workbench.causal_variables import METHODS, DASConfig, align, check_variable, plot_iia, world_pairs
    from workbench.errors import WorkbenchError
    from workbench.hooks import site_shape
    from workbench.models import load
    from workbench.sites import resolve_site
    from workbench.storage import atomic_write_json, fill_new_folder

    out = new_folder(args.out, "--out")
    if not 0.0 < args.held_out < 1.0:
        raise WorkbenchError(f"--held-out {args.held_out}: give the share of pairs held out, in (0, 1), e.g. 0.3")
    if not args.lr > 0:
        raise WorkbenchError(f"--lr {args.lr}: give a positive learning rate such as 0.01")
    if args.threads:
        torch.set_num_threads(args.threads)
    handle = load(args.model, device=args.device, progress=False)
    site = resolve_site(handle, args.site)
    shape = site_shape(handle, site.name)
    width = shape[1] if len(shape) == 4 else shape[-1]
    if args.dim > width:
        raise WorkbenchError(f"--dim {args.dim} is larger than site {args.site}'s width {width}; give 1..{width}")
    dictionary = None
    if args.sae is not None:
        from workbench.dictionaries.ground_truth import check_dictionary_fits
        from workbench.dictionaries.sae import load_dictionary

        if not Path(args.sae).is_dir():
            raise WorkbenchError(f"--sae {args.sae} is not a folder; give a dictionary folder (cfg.json + "
                                 "sae_weights.safetensors) trained on this model's site")
        dictionary = load_dictionary(args.sae, device=handle.device)
        own = dictionary.config.hook_name
        if not own or (resolve_site(handle, own).module_path, resolve_site(handle, own).side) != (site.module_path,
                                                                                                    site.side):
            raise WorkbenchError(f"--sae {args.sae} was trained on site {own or 'unknown'!r}, not {args.site!r}; give "
                                 f"--site {own} or a dictionary trained on {args.site}")
        check_dictionary_fits(handle, dictionary, site=args.site)  # the model's fingerprint and the width
    check_variable(handle, args.variable)
    if args.position is not None and args.variable not in ("subject", "relation"):
        raise WorkbenchError(f"--position is for FactGPT's variables; {args.variable} is read from the whole feature map")
    pairs = world_pairs(handle, args.variable, n=args.n, seed=args.seed, position=args.position)
    methods = tuple(m for m in METHODS if m != "sae" or dictionary is not None)
    config = DASConfig(dim=args.dim, steps=args.steps, batch_size=args.batch_size, lr=args.lr, held_out=args.held_out,
                       seed=args.seed, methods=methods)
    result = align(handle, pairs, args.site, config, dictionary=dictionary, progress=not args.json)
    doc = {"model": args.model, **result.to_json(), "sae": args.sae, "out": str(out) if out is not None else None}
    if out is not None:
        def fill(tmp: Path) -> None:
            atomic_write_json(tmp / "das.json", doc)
            plot_iia(result, tmp / "das.png")

        fill_new_folder(out, fill)
    args.emit(args, doc, _text)


def _text(r: dict[str, Any]) -> str:
    head = (f"{r['variable']} at {r['site']} of {r['model']} (width {r['width']}): held-out IIA on {r['n_test']} pairs "
            f"({r['n_train']} to fit), no intervention {r['no_intervention_iia']:.3f}")
    lines = [head]
    for m in r["methods"]:
        lo, hi = m["ci"]
        ci = f"[{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "[-]"
        lines.append(f"  {m['method']:<11} k={m['k']:<4} IIA {m['iia']:.3f} {ci}  (train {m['train_iia']:.3f})")
    if r.get("out"):
        lines.append(f"  wrote {r['out']}/das.json and das.png")
    return "\n".join(lines)


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], emit: Callable[..., None]) -> None:
    p = sub.add_parser("das", help="distributed alignment search for a world variable; IIA beside probe, LEACE, "
                                   "diff-in-means, SAE and random subspaces")
    p.add_argument("model", help="zoo:factgpt, zoo:shapesnet or a variant of them (a model trained on a world)")
    p.add_argument("--variable", required=True, choices=VARIABLES,
                   help="subject or relation (FactGPT), shape or colour (ShapesNet)")
    p.add_argument("--site", required=True, help="activation site, e.g. blocks.0.hook_resid_post or layer3")
    p.add_argument("--dim", type=positive_int, default=8, help="subspace dimension k (default 8)")
    p.add_argument("--sae", default=None, help="a dictionary folder on the same model and site: adds the SAE baseline")
    p.add_argument("--out", required=True, help="new folder for das.json and das.png")
    p.add_argument("--position", default=None, choices=("subject", "last"),
                   help="FactGPT: intervene at the subject's last token or the last token "
                        "(default: subject for subject, last for relation)")
    p.add_argument("--n", type=positive_int, default=1000, help="interchange pairs (default 1000)")
    p.add_argument("--held-out", type=finite_float, default=0.3, help="share of pairs held out for IIA (default 0.3)")
    p.add_argument("--steps", type=positive_int, default=300, help="DAS optimization steps (default 300)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="DAS pairs per step (default 64)")
    p.add_argument("--lr", type=finite_float, default=0.01, help="DAS learning rate (default 0.01)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--threads", type=threads, default=None, help="torch CPU threads")
    common(p)
    p.set_defaults(func=_das, emit=emit)
