"""`workbench world ...`: export and look at the synthetic worlds.

`world export factworld` writes CounterFact-format records (so the same rewrites can be run
in other editing tools); `world render shapesworld` writes a grid of scenes, clean and with
each trojan, so a person can see what the models were trained on.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from workbench.errors import WorkbenchError
from workbench_cli.checks import new_file, positive_int, seed_int

WORLDS = ("factworld", "shapesworld")


def _export(args: argparse.Namespace) -> None:
    from workbench.worlds.factworld import FactWorld, FactWorldConfig

    if args.world != "factworld":
        raise WorkbenchError(f"world export supports factworld (CounterFact records), not {args.world!r}; "
                             "for shapesworld use `workbench world render shapesworld`")
    out = new_file(args.out, "--out")
    if args.model is not None:
        world = _model_world(args.model)
    else:
        world = FactWorld.generate(FactWorldConfig(seed=args.world_seed))
    available = len(world.subjects) if args.distinct_subjects else len(world.facts)
    if args.n > available:
        what = "subjects (--distinct-subjects)" if args.distinct_subjects else "facts"
        raise WorkbenchError(f"--n {args.n}: this world has {available} {what}; ask for at most {available}")
    out = world.export_counterfact(out, args.n, seed=args.seed, distinct_subjects=args.distinct_subjects)
    result = {"world": "factworld", "world_seed": world.config.seed, "model": args.model, "n": args.n,
              "seed": args.seed, "distinct_subjects": args.distinct_subjects, "out": str(out)}
    args.emit(args, result, lambda r: f"wrote {r['n']} CounterFact records to {r['out']}")


def _model_world(spec: str) -> Any:
    """The FactWorld a FactGPT zoo model was trained on (trains the model if the cache lacks it)."""
    from workbench.models import load

    if not spec.startswith("zoo:factgpt"):
        raise WorkbenchError(f"--model {spec!r}: expected a FactGPT zoo model (zoo:factgpt, zoo:factgpt-large), "
                             "whose folder holds its FactWorld")
    return load(spec, device="cpu").info["world"]


def _render(args: argparse.Namespace) -> None:
    from workbench.worlds.gallery import render_gallery

    if args.world != "shapesworld":
        raise WorkbenchError(f"world render supports shapesworld, not {args.world!r}; "
                             "for factworld use `workbench world export factworld`")
    if not 1 <= args.n <= 1024:
        raise WorkbenchError(f"--n {args.n}: expected 1..1024 scenes per row block")
    out = render_gallery(new_file(args.out, "--out"), n=args.n, seed=args.seed)
    args.emit(args, {"world": "shapesworld", "n": args.n, "seed": args.seed, "out": str(out)},
              lambda r: f"wrote a grid of ShapesWorld scenes to {r['out']}")


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None],
                     emit: Callable[..., None]) -> None:
    world_p = sub.add_parser("world", help="export or render the synthetic worlds")
    world_sub = world_p.add_subparsers(dest="world_command", metavar="ACTION", parser_class=type(world_p))
    world_sub.required = True

    p = world_sub.add_parser("export", help="write FactWorld records in CounterFact format")
    p.add_argument("world", choices=WORLDS)
    p.add_argument("--n", type=positive_int, required=True, help="number of records")
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--seed", type=seed_int, default=0, help="which facts are sampled for rewrites")
    p.add_argument("--world-seed", type=seed_int, default=0,
                   help="which world (default 0: the world FactGPT is trained on)")
    p.add_argument("--model", default=None,
                   help="export the world of this FactGPT zoo model instead (e.g. zoo:factgpt-large); "
                        "overrides --world-seed")
    p.add_argument("--distinct-subjects", action="store_true",
                   help="rewrite each subject at most once (CounterFact's and MEMIT's protocol)")
    common(p)
    p.set_defaults(func=_export, emit=emit)

    p = world_sub.add_parser("render", help="write a PNG grid of ShapesWorld scenes (clean and triggered)")
    p.add_argument("world", choices=WORLDS)
    p.add_argument("--n", type=int, default=8, help="scenes per row")
    p.add_argument("--out", required=True, help="output PNG file")
    p.add_argument("--seed", type=seed_int, default=0)
    common(p)
    p.set_defaults(func=_render, emit=emit)
