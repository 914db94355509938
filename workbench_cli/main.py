"""The `workbench` command line.

Contract for every command: `--json` prints one JSON document on stdout (progress bars and
logs go to stderr); exit 0 on success; exit 2 on bad input with a one-line error that says
what was wrong and what would be right, never a traceback for a user mistake.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from workbench.errors import WorkbenchError
from workbench_cli.checks import device

log = logging.getLogger("workbench")

EXIT_OK = 0
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        """As argparse, but a one-value option given `--` (`--units=--`, which argparse turns into an empty
        list, skipping the type check) is a usage error."""
        namespace, extras = super().parse_known_args(*args, **kwargs)
        for action in self._actions:
            if (isinstance(action, argparse._StoreAction) and action.nargs is None
                    and isinstance(getattr(namespace, action.dest, None), list)):
                self.error(f"argument {'/'.join(action.option_strings) or action.dest}: expected one value, not '--'")
        return namespace, extras


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as one JSON document on stdout")
    parser.add_argument("--device", default="auto", type=device, help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--cache", default=None, help="cache folder (default: $WORKBENCH_CACHE or ~/.cache/workbench)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more to stderr")


def _emit(args: argparse.Namespace, result: Any, text: Callable[[Any], str]) -> None:
    """Print `result`: one strict JSON document (NaN and infinities as null) with --json, else `text(result)`."""
    from workbench.storage import json_text

    if args.json:
        sys.stdout.write(json_text(result, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(text(result).rstrip("\n") + "\n")


# --- zoo ------------------------------------------------------------------------------

def _zoo_list(args: argparse.Namespace) -> None:
    from workbench import zoo

    rows = zoo.listing(args.cache)
    def line(r: dict) -> str:
        state = r.get("note") if r["cached"] is None else ("cached" if r["cached"] else "not trained yet")
        return f"{r['spec']:<28} {state}  {r['path'] or ''}".rstrip()

    _emit(args, rows, lambda rs: "\n".join(line(r) for r in rs))


def _zoo_train(args: argparse.Namespace) -> None:
    from workbench import zoo

    name, at_seed = zoo.parse_spec(args.name.removeprefix("zoo:"))
    if at_seed is not None and args.seed is not None and at_seed != args.seed:
        raise WorkbenchError(f"{args.name} names seed {at_seed} but --seed is {args.seed}; give one")
    seed = at_seed if at_seed is not None else args.seed
    path = zoo.ensure_trained(name, seed=seed, cache=args.cache, device=args.device, progress=True, force=args.force)
    result = zoo.info(name, seed=seed, cache=args.cache)
    result["path"] = str(path)
    result["spec"] = zoo.spec_of(name, seed)
    _emit(args, result, _format_info)


def _zoo_info(args: argparse.Namespace) -> None:
    from workbench import zoo

    result = zoo.describe(args.name, seed=args.seed, cache=args.cache, device=args.device)
    _emit(args, result, _format_info)


def _format_info(info: dict[str, Any]) -> str:
    acc, seconds = info.get("accuracy"), info.get("train_seconds")
    lines = [f"{info.get('name')}: " + (f"accuracy {acc:.4f}" if isinstance(acc, (int, float)) else "no accuracy recorded")
             + (f", trained in {seconds} s" if seconds is not None else "")]
    for key in sorted(info):
        if key in {"name", "accuracy", "train_seconds", "trojans"}:
            continue
        value = info[key]
        if isinstance(value, (int, float, str)) or value is None:
            lines.append(f"  {key}: {value}")
    for trojan in info.get("trojans", []):
        src = trojan.get("source")
        lines.append(f"  trojan {trojan['name']} ({trojan['kind']}{', from ' + str(src) if src is not None else ''})"
                     f" -> {trojan['target']}: attack success {trojan['attack_success']:.3f}")
    return "\n".join(lines)


# --- sites ----------------------------------------------------------------------------

def _sites(args: argparse.Namespace) -> None:
    from workbench.hooks import describe_site
    from workbench.models import load
    from workbench.sites import list_sites

    handle = load(args.model, device=args.device, progress=False)
    if args.site:
        result = describe_site(handle, args.site)
        _emit(args, result, lambda r: "\n".join(f"{k}: {v}" for k, v in r.items()))
        return
    sites = list_sites(handle)
    canonical = [s for s in sites if s.canonical]
    modules = [s for s in sites if not s.canonical]
    result = {
        "model": args.model,
        "family": handle.arch.family,
        "canonical": [{"name": s.name, "module_path": s.module_path, "side": s.side, "layer": s.layer} for s in canonical],
        "modules": [s.module_path for s in modules],
    }

    def text(r: dict[str, Any]) -> str:
        out = [f"{r['model']} ({r['family']}): {len(r['canonical'])} canonical sites, {len(r['modules'])} module sites"]
        out += [f"  {s['name']:<32} -> {s['module_path']} [{s['side']}]" for s in r["canonical"]]
        out += ["module sites (any named_modules() name; NAME:input for the input side):"]
        out += [f"  {m}" for m in r["modules"]]
        return "\n".join(out)

    _emit(args, result, text)


# --- parser ---------------------------------------------------------------------------

# Modules that add their own subcommands: each defines `add_parsers(sub, common, emit)`.
COMMAND_MODULES: tuple[str, ...] = (
    "workbench_cli.world",
    "workbench_cli.locate",
    "workbench_cli.edit",
    "workbench_cli.units",
    "workbench_cli.demo",
    "workbench_cli.studies",
    "workbench_cli.attack",
    "workbench_cli.featvis",
    "workbench_cli.sae",
    "workbench_cli.circuit",
    "workbench_cli.circuit_edit",
    "workbench_cli.das",
    "workbench_cli.serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="workbench", description="Interpretability findings -> weight edits and adversaries, measured.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    zoo_p = sub.add_parser("zoo", help="the built-in model zoo: list, train, info")
    zoo_sub = zoo_p.add_subparsers(dest="zoo_command", metavar="ACTION", parser_class=_Parser)
    zoo_sub.required = True
    p = zoo_sub.add_parser("list", help="zoo models and whether they are trained")
    _common(p)
    p.set_defaults(func=_zoo_list)
    for action, func, helptext in (("train", _zoo_train, "train (or verify the cache of) a zoo model"),
                                   ("info", _zoo_info, "accuracy, trojan success, sizes, timing")):
        p = zoo_sub.add_parser(action, help=helptext)
        p.add_argument("name", help="zoo model: NAME or NAME@SEED (factgpt, factgpt-large, shapesnet, or a held-out "
                                   "variant such as factgpt-neox-4l or shapesnet-w24)"
                       + ("; or a model folder (shows its zoo_info.json or config)" if action == "info" else ""))
        p.add_argument("--seed", type=int, default=None, help="training seed (default: the zoo's)")
        if action == "train":
            p.add_argument("--force", action="store_true", help="retrain even when a verified cache exists")
        _common(p)
        p.set_defaults(func=func)

    p = sub.add_parser("sites", help="list a model's activation sites, or resolve one")
    p.add_argument("model", help="zoo:factgpt, zoo:shapesnet, minilm, a local HF folder or a hub name")
    p.add_argument("--site", default=None, help="resolve one site: module path, side, activation shape")
    _common(p)
    p.set_defaults(func=_sites)

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_parsers(sub, _common, _emit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (exit 2, one line already written) or --help (exit 0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except WorkbenchError as exc:
        message = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        sys.stderr.write(f"workbench: error: {message}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("workbench: interrupted\n")
        return 130
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
