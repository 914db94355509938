"""`workbench ablate-circuit`: a circuit's heads, MLPs or channels replaced by their mean (or zero), as a weight delta.

    workbench ablate-circuit zoo:factgpt --circuit circ/circuit.json --value mean --out abl/ --json
    workbench ablate-circuit ./my-gpt2 --circuit circ/circuit.json --nodes a1.h2,m0 --value zero --out abl/
    workbench ablate-circuit zoo:shapesnet --circuit circ/circuit.json --top 12 --ranking signed \\
        --trojan patch-universal --out abl/ --json

The nodes are the circuit's own (an edge circuit's senders), `--nodes` by name, or `--top K` by
score; `--complement` ablates every other node instead. Means are taken over reference inputs:
ShapesNet's clean scenes (with `--trojan`, the trojan-surgery protocol's clean selection scenes),
FactGPT's prompts, or `--reference texts.json` (a JSON list of texts). The delta is folded exactly
(`editors.circuit_ablation`) and written to `--out` as `delta.safetensors` beside `result.json`.
With `--trojan` (ShapesNet), attack success and clean accuracy are measured on the protocol's
evaluation scenes before and after, beside as many random nodes of the same kinds (run-time
hook, seeded draws). Bad input (a circuit of another model, an unknown node, an empty selection,
a node that does not fold, an existing --out) exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench_cli.checks import new_folder, positive_int, seed_int, threads


def _reference(args: argparse.Namespace, handle: Any, case: Any) -> Any:
    """The inputs the means are taken over (None for value zero)."""
    import torch

    if args.value == "zero":
        return None
    if case is not None:
        return case.x_ref
    if args.reference:
        path = Path(args.reference)
        try:
            texts = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WorkbenchError(f"--reference {path}: cannot read it as JSON ({exc}); give a JSON list of texts") from None
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise WorkbenchError(f"--reference {path}: expected a non-empty JSON list of non-empty texts")
        return texts
    if handle.kind == "image_classifier" and "world" in handle.info:
        from workbench.zoo.shapesnet import world_of

        world = world_of(handle)
        return world.render(world.sample(args.n_ref, generator=torch.Generator().manual_seed(args.seed)))
    world = handle.world
    if world is not None and hasattr(world, "prompts"):
        prompts = [p.text for p in world.prompts()]
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed))[:args.n_ref]
        return [prompts[int(i)] for i in order]
    raise WorkbenchError(f"--value mean needs inputs to take means over and {handle.spec} has no world: give "
                         "--reference texts.json (a JSON list of texts), or --value zero")


def _ablate_circuit(args: argparse.Namespace) -> None:
    import torch

    from editors.circuit_ablation import CircuitAblation, CircuitAblationRequest, circuit_graph, select_nodes
    from workbench.circuits import Circuit
    from workbench.models import load
    from workbench.storage import atomic_write_json, fill_new_folder, json_default

    out = new_folder(args.out, "--out")
    nodes = None
    if args.nodes is not None:
        nodes = tuple(n.strip() for n in args.nodes.split(",") if n.strip())
        if not nodes:
            raise WorkbenchError(f"--nodes {args.nodes!r} names no node; give e.g. a1.h2,m0 or layer2.relu2.c10")
    if nodes is not None and args.top is not None:
        raise WorkbenchError("give --nodes or --top, not both")
    circuit = Circuit.load(args.circuit)
    if args.threads:
        torch.set_num_threads(args.threads)
    handle = load(args.model, device=args.device, progress=False)
    handle.model.eval()
    circuit.check_model(handle)
    graph = circuit_graph(handle, circuit)
    select_nodes(circuit, graph, nodes=nodes, top=args.top, ranking=args.ranking, complement=args.complement)
    case = None
    if args.trojan:
        case = _case(handle, args)
    request = CircuitAblationRequest(circuit, nodes=nodes, top=args.top, ranking=args.ranking, complement=args.complement,
                                     reference=_reference(args, handle, case))
    delta = CircuitAblation(value=args.value).fit(handle, request)
    chosen = delta.extra["nodes"]
    result: dict[str, Any] = {
        "model": args.model, "circuit": str(args.circuit), "task": circuit.task, "method": circuit.method,
        "level": circuit.level, "value": args.value, "complement": args.complement, "nodes": chosen,
        "n_nodes": len(chosen), "params": delta.extra["params"],
        "norms": {k: round(v, 6) for k, v in delta.norms().items()},
    }
    if case is not None:
        result.update(_trojan_effect(handle, case, request, graph, delta, args))
    result["out"] = str(out)
    result["delta_path"] = str(out / "delta.safetensors")

    def fill(tmp: Path) -> None:
        delta.save(tmp / "delta.safetensors")
        atomic_write_json(tmp / "result.json", json.loads(json.dumps(result, default=json_default)))

    fill_new_folder(out, fill)
    args.emit(args, result, _text)


def _case(handle: Any, args: argparse.Namespace) -> Any:
    from workbench_protocols.surgery import EvaluationConfig, SelectionConfig, SurgeryConfig, prepare_case

    if handle.kind != "image_classifier" or "world" not in handle.info:
        raise WorkbenchError(f"--trojan needs a ShapesNet (zoo:shapesnet); {handle.spec} has no ShapesWorld")
    names = [t.name for t in _world_trojans(handle)]
    if args.trojan not in names:
        raise WorkbenchError(f"unknown trojan {args.trojan!r}; this model's trojans: {', '.join(names)}")
    config = SurgeryConfig(selection=SelectionConfig(n_select=1, n_ref=args.n_ref),
                           evaluation=EvaluationConfig(n_eval=args.n_eval, n_clean=args.n_clean), seed=args.seed)
    return prepare_case(handle, args.trojan, config)


def _world_trojans(handle: Any) -> Any:
    from workbench.zoo.shapesnet import world_of

    return list(world_of(handle).trojans)


def _trojan_effect(handle: Any, case: Any, request: Any, graph: Any, delta: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Attack success and clean accuracy on the surgery protocol's evaluation scenes (seed + 1000), before and
    after, and with as many random nodes of the same kinds mean-ablated at run time (`args.draws` draws)."""
    from dataclasses import replace

    from editors.circuit_ablation import ablation_hook, random_nodes, resolve_ablation
    from workbench_protocols.surgery import edit_beside_controls

    chosen = delta.extra["nodes"]
    controls = []
    for draw in range(args.draws):
        picked = random_nodes(graph, len(chosen), exclude=chosen, seed=args.seed * 1000 + draw, like=chosen)
        ablation = resolve_ablation(handle, replace(request, nodes=tuple(picked), top=None, complement=False),
                                    args.value, graph)
        controls.append(("nodes", picked, ablation_hook(handle, ablation)))
    out: dict[str, Any] = {"trojan": args.trojan, **edit_beside_controls(case, delta, controls)}
    out.update({"n_eval": args.n_eval, "n_clean": args.n_clean, "seed": args.seed})
    return out


def _text(r: dict[str, Any]) -> str:
    shown = ", ".join(r["nodes"][:10]) + (", ..." if r["n_nodes"] > 10 else "")
    lines = [(f"{r['value']}-ablated {r['n_nodes']} node(s) of the {r['method']} circuit for {r['task']}"
              f"{' (its complement)' if r['complement'] else ''}: {shown}"),
             f"  folded into {', '.join(r['params'])}"]
    if "asr_before" in r:
        from workbench_protocols.surgery import beside_controls_lines

        lines += beside_controls_lines(r, "random nodes")
    lines.append(f"  delta: {r['delta_path']}")
    return "\n".join(lines)


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], emit: Callable[..., None]) -> None:
    p = sub.add_parser("ablate-circuit", help="replace a circuit's heads/MLPs/channels by their mean, as a weight delta")
    p.add_argument("model", help="the model the circuit was found on (zoo:factgpt, zoo:shapesnet, a folder)")
    p.add_argument("--circuit", required=True, help="circuit.json written by `workbench circuit`")
    p.add_argument("--nodes", default=None, help="comma-separated nodes to ablate (a1.h2,m0; layer2.relu2.c10)")
    p.add_argument("--top", type=positive_int, default=None, help="ablate the K best-scored nodes of the circuit")
    p.add_argument("--ranking", default=None, choices=("abs", "signed"),
                   help="--top: order by |score| or by signed score (default: the circuit's own)")
    p.add_argument("--complement", action="store_true", help="ablate every node outside the selection instead")
    p.add_argument("--value", default="mean", choices=("mean", "zero"), help="what replaces a node (default mean)")
    p.add_argument("--reference", default=None, help="--value mean on a model without a world: a JSON list of texts")
    p.add_argument("--n-ref", type=positive_int, default=1000, help="reference inputs the means are taken over")
    p.add_argument("--trojan", default=None, help="ShapesNet: measure this trojan's attack success and clean accuracy "
                                                  "before and after, beside random nodes")
    p.add_argument("--n-eval", type=positive_int, default=500, help="--trojan: triggered evaluation scenes")
    p.add_argument("--n-clean", type=positive_int, default=1000, help="--trojan: clean evaluation scenes")
    p.add_argument("--draws", type=positive_int, default=3, help="--trojan: random-node control draws")
    p.add_argument("--out", required=True, help="new folder for delta.safetensors and result.json")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--threads", type=threads, default=None, help="torch CPU threads")
    common(p)
    p.set_defaults(func=_ablate_circuit, emit=emit)
