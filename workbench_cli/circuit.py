"""`workbench circuit`: find the components that carry a behaviour, and score the method MIB's way.

    workbench circuit zoo:factgpt --task facts --method eap-ig --out circ/ --json
    workbench circuit zoo:shapesnet --task trojan:patch-universal --method acdc --level node
    workbench circuit ./my-gpt2 --task pairs.json --method eap --level edge --out circ/
    workbench circuit zoo:factgpt --task facts --method mask --sparsity 0.3 --json   # learned edge mask

`--task` is `facts` (a FactGPT prompt beside the same prompt with another subject), `trojan:NAME`
(a ShapesNet scene with and without the trigger) or a JSON file of prompt pairs
(`clean`, `corrupted`, `answer`, `corrupted_answer`). Transformers give edge circuits between
heads and MLPs in the residual graph (`--level node` for heads and MLPs alone); CNNs give
channel circuits (`--level node`). The output names the method, the circuit's nodes and edges,
CPR and CMD beside random circuits of the same sizes, and the seconds it took; `--out` gets
`circuit.json` and `circuit.png` (faithfulness curves and the score heatmap). Bad input (an
unknown task or method, a task the model cannot do, an empty pairs file, an existing --out)
exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench_cli.checks import finite_float, new_folder, positive_int, seed_int, threads

METHODS = ("eap", "eap-ig", "acdc", "mask")


def _circuit(args: argparse.Namespace) -> None:
    import torch

    from workbench.circuits import DiscoveryConfig, component_graph, find_circuit, task_for
    from workbench.circuits.plots import plot_circuit
    from workbench.errors import WorkbenchError
    from workbench.models import load
    from workbench.storage import fill_new_folder

    out = new_folder(args.out, "--out")
    if not 0.0 < args.target <= 1.0:
        raise WorkbenchError(f"--target {args.target}: give the share of the behaviour the circuit must keep, in (0, 1]")
    if args.sparsity < 0:
        raise WorkbenchError(f"--sparsity {args.sparsity}: give a weight >= 0 for the mask's size, e.g. 0.3")
    if args.threshold < 0:
        raise WorkbenchError(f"--threshold {args.threshold}: give a share of the behaviour >= 0, e.g. 0.01")
    if args.threads:
        torch.set_num_threads(args.threads)
    handle = load(args.model, device=args.device, progress=False)
    task = task_for(handle, args.task, n=args.n, seed=args.seed)
    level = args.level or ("node" if handle.kind == "image_classifier" else "edge")
    graph = component_graph(handle)
    graph.components(level)  # a CNN asked for edges fails here, before any work
    config = DiscoveryConfig(method=args.method, level=level, steps=args.steps, threshold=args.threshold,
                             target=args.target, random_draws=args.random_draws, seed=args.seed,
                             mask_steps=args.mask_steps, sparsity=args.sparsity)
    circuit = find_circuit(handle, task, config, graph=graph, progress=not args.json)
    r = circuit.results
    result: dict[str, Any] = {
        "model": args.model, "task": circuit.task, "method": circuit.method, "level": circuit.level,
        "nodes": circuit.nodes, "edges": [f"{u}->{v}" for u, v in circuit.edges],
        "n_nodes": len(circuit.nodes), "n_edges": len(circuit.edges), "n_components": len(circuit.components),
        "faithfulness": r["faithfulness"], "cpr": r["cpr"], "cmd": r["cmd"], "random_cpr": r["random_cpr"],
        "random_cmd": r["random_cmd"], "clean_metric": r["clean_metric"], "corrupted_metric": r["corrupted_metric"],
        "seconds": r["seconds"], "top": [{"component": c, "score": round(s, 6)} for c, s in circuit.top(10)],
        "settings": r["settings"], "out": str(out) if out is not None else None,
    }
    if out is not None:
        def fill(tmp: Path) -> None:
            circuit.save(tmp / "circuit.json")
            plot_circuit(circuit, tmp / "circuit.png")

        fill_new_folder(out, fill)
    args.emit(args, result, _text)


def _text(r: dict[str, Any]) -> str:
    size = (f"{r['n_nodes']} of {r['n_components']} nodes" if r["level"] == "node" else
            f"{r['n_edges']} of {r['n_components']} edges ({r['n_nodes']} nodes)")
    lines = [f"{r['method']} {r['level']} circuit for {r['task']} on {r['model']}: {size}, faithfulness {r['faithfulness']:.3f}",
             (f"  CPR {r['cpr']:.3f} (random {r['random_cpr']:.3f}), CMD {r['cmd']:.3f} (random {r['random_cmd']:.3f}); "
              f"found in {r['seconds']:.2f} s"),
             "  top components: " + ", ".join(f"{t['component']} {t['score']:+.3g}" for t in r["top"][:6])]
    if r.get("out"):
        lines.append(f"  wrote {r['out']}/circuit.json and circuit.png")
    return "\n".join(lines)


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], emit: Callable[..., None]) -> None:
    p = sub.add_parser("circuit", help="find the heads/MLPs/channels and edges that carry a behaviour; CPR/CMD vs random")
    p.add_argument("model", help="zoo:factgpt, zoo:shapesnet, a local Hugging Face folder or a hub name")
    p.add_argument("--task", required=True, help="facts, trojan:NAME (e.g. trojan:patch-universal) or a JSON file of "
                                                 "prompt pairs")
    p.add_argument("--method", default="eap-ig", choices=METHODS, help="attribution patching, its integrated-gradients "
                                                                        "form, ACDC (slow reference) or a learned mask")
    p.add_argument("--level", default=None, choices=("node", "edge"),
                   help="edge (transformers' default) or node (heads and MLPs; channels for CNNs, their default)")
    p.add_argument("--out", default=None, help="new folder for circuit.json and circuit.png")
    p.add_argument("--n", type=positive_int, default=32, help="facts and trojan tasks: number of example pairs")
    p.add_argument("--steps", type=positive_int, default=5, help="eap-ig: integration steps")
    p.add_argument("--threshold", type=finite_float, default=0.01, help="acdc: share of the behaviour an edge must carry")
    p.add_argument("--target", type=finite_float, default=0.9,
                   help="eap, eap-ig: the circuit is the smallest top-k keeping this share of the behaviour")
    p.add_argument("--mask-steps", type=positive_int, default=100, help="mask: optimization steps")
    p.add_argument("--sparsity", type=finite_float, default=0.3, help="mask: weight of the circuit's size in the loss")
    p.add_argument("--random-draws", type=positive_int, default=5, help="random circuits per size")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--threads", type=threads, default=None, help="torch CPU threads")
    common(p)
    p.set_defaults(func=_circuit, emit=emit)
