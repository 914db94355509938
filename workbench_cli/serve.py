"""`workbench serve`: the find -> predict -> edit -> measure loop in a browser.

    workbench serve                                  # http://127.0.0.1:8000, workspace ./workbench-workspace
    workbench serve --workspace runs/app --port 8080
    workbench serve --host 0.0.0.0 --token "$TOKEN"  # other machines: every request needs the token
    workbench serve --study mypkg.studies:MyStudy     # offer your own CaseStudy on the Studies page too

On 127.0.0.1 (the default) only this machine can connect and no token is needed; on any
other host a token is required (a random one is printed when none is given).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

DEFAULT_WORKSPACE = "workbench-workspace"


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number; expected 1..65535") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range; expected 1..65535")
    return port


def _offered_studies(items: list[str] | None) -> tuple[str, ...]:
    """`--study module:Class` flags, each loaded now so a typo stops the server before it starts."""
    import case_studies

    out: list[str] = []
    for item in items or []:
        if ":" not in item:
            raise WorkbenchError(f"--study {item!r}: expected module:Class of a CaseStudy (the numbered studies are "
                                 "always offered)")
        case_studies.resolve(item)
        if item not in out:
            out.append(item)
    return tuple(out)


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from workbench.devices import resolve_device
    from workbench_app import AppConfig, create_app
    from workbench_app.security import is_loopback, token_required

    token = token_required(args.host, args.token)
    workspace = Path(args.workspace).expanduser()
    if workspace.exists() and not workspace.is_dir():
        raise WorkbenchError(f"--workspace {args.workspace} is a file; give a folder (created if missing)")
    device = str(resolve_device(args.device))
    offered = _offered_studies(args.study)
    app = create_app(AppConfig(workspace=workspace, token=token, device=device, cache=args.cache,
                               torch_threads=args.threads, studies=offered))
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    info = {"url": url, "host": args.host, "port": args.port, "workspace": str(workspace.resolve()),
            "token": token, "loopback_only": is_loopback(args.host)}
    args.emit(args, info, lambda r: f"workbench serve: open {r['url']}\n  workspace {r['workspace']}"
              + ("" if r["token"] is None else "\n  every request needs the token (it is in the address above)"))
    sys.stdout.flush()
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning",
                timeout_graceful_shutdown=5)


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], emit: Callable[..., None]) -> None:
    p = sub.add_parser("serve", help="the web app: trace, predict, edit and measure in a browser")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; any "
                                                       "other needs a token)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    p.add_argument("--workspace", default=DEFAULT_WORKSPACE,
                   help=f"folder for models' edit stacks, jobs and exports (default ./{DEFAULT_WORKSPACE}); the app "
                        "reads and writes only inside it")
    p.add_argument("--token", default=None, help="token every request must carry (default: none on 127.0.0.1, a "
                                                 "random one printed at start on any other host)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--study", action="append", metavar="MODULE:CLASS",
                   help="also offer this CaseStudy class on the Studies page (imports it); repeatable")
    common(p)
    p.set_defaults(func=_serve, emit=emit)
