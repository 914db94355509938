"""`workbench sae train | features | quality | ablate | steer`: sparse dictionaries on a model's site.

    workbench sae train zoo:shapesnet --site layer2 --out sae-l2/ --kind topk --width 256 --k 8 --json
    workbench sae train zoo:factgpt --site blocks.2.hook_resid_post --out sae-f/ --kind relu
    workbench sae train ./my-gpt2 --site blocks.3.mlp.hook_out --kind transcoder --corpus texts.txt --out tc/
    workbench sae features zoo:shapesnet --sae sae-l2/ --json            # the world's known features
    workbench sae features minilm --sae sae-m/ --labels labelled.json     # a user's labelled examples
    workbench sae quality zoo:shapesnet --sae sae-l2/ --json
    workbench sae ablate zoo:shapesnet --sae sae-l3/ --latent 21 --trojan patch-universal --json

`train` streams activations from the model's world (ShapesNet scenes, FactGPT's text) or
`--corpus` (one text per line, or a JSON list), trains (cached by model fingerprint, resumed
after an interruption), measures quality on a held-out stream and writes `cfg.json` +
`sae_weights.safetensors` (SAELens's format) to `--out`; it prints l0, explained_variance,
path and the other quality figures. `features` prints, per known feature, the best latent's
AUROC (with precision, recall and 95% bootstrap intervals) beside difference-in-means and a
linear probe on the same examples; `--blind` adds, per ShapesNet trojan, the rank of its
trigger latent among latents ranked by their effect on the target logit on clean scenes.
`ablate` projects the chosen latents' decoder directions out of the site as a weight delta
(`editors.latent_edit`), and with `--trojan` measures attack success and clean accuracy on the
trojan-surgery protocol's evaluation scenes beside as many random latents; `steer` adds a strength
times the latents' directions to the bias that writes the site. Bad input (unknown site, width <= 0, k > width, a dictionary trained on another model or
site, an existing --out) exits 2 with one line.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from workbench.errors import WorkbenchError
from workbench_cli.checks import finite_float, int_list, new_file, new_folder, positive_int, seed_int, threads

KINDS = ("topk", "relu", "jumprelu", "transcoder")


def _load(args: argparse.Namespace) -> Any:
    import torch

    from workbench.models import load

    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, device=args.device, progress=False)


def _cache(args: argparse.Namespace) -> Any:
    if args.no_cache:
        return False
    return True if args.cache is None else args.cache


def _train(args: argparse.Namespace) -> None:
    from workbench.dictionaries.activations import read_corpus
    from workbench.dictionaries.train import TrainConfig, train_dictionary
    from workbench.sites import resolve_site

    if args.k is not None and args.width is not None and args.k > args.width:
        raise WorkbenchError(f"--k {args.k} exceeds --width {args.width}; TopK keeps at most width latents")
    if args.k is not None and args.kind != "topk":
        raise WorkbenchError(f"--k is a TopK setting; --kind {args.kind} has none")
    if args.site_out is not None and args.kind != "transcoder":
        raise WorkbenchError("--site-out is for --kind transcoder (an SAE reconstructs its own site)")
    out = new_folder(args.out, "--out")
    config = TrainConfig(kind=args.kind, width=args.width, expansion=args.expansion, k=args.k,
                         n_activations=args.n_activations, batch_size=args.batch_size, lr=args.lr, sparsity=args.sparsity,
                         seed=args.seed, threads=args.threads)
    corpus = read_corpus(args.corpus) if args.corpus else None
    handle = _load(args)
    resolve_site(handle, args.site)  # an unknown site fails first, listing the valid ones
    if args.site_out is not None:
        resolve_site(handle, args.site_out)
    trained = train_dictionary(handle, args.site, config, corpus=corpus, out_site=args.site_out, cache=_cache(args), out=out,
                               eval_activations=args.eval_activations, progress=not args.json)
    d = trained.dictionary
    q = trained.quality
    meta = d.config.metadata
    result = {
        "model": args.model, "site": d.config.hook_name, "site_out": d.config.hook_name_out, "kind": d.kind,
        "width": d.d_sae, "k": d.config.k, "d_in": d.config.d_in, "path": str(out),
        "l0": q.get("l0"), "explained_variance": q.get("explained_variance"), "mse": q.get("mse"),
        "dead": q.get("dead"), "dead_fraction": q.get("dead_fraction"), "dense": q.get("dense"),
        "dense_fraction": q.get("dense_fraction"), "downstream": q.get("downstream"),
        "n_eval_activations": q.get("n_activations"), "cached": trained.cached, "resumed_from_step": trained.resumed_from_step,
        "cache_path": str(trained.path) if trained.path is not None else None, "key": trained.key,
        "throughput": meta.get("train_throughput"), "train": meta.get("train"), "source": meta.get("source"),
        "model_fingerprint": meta.get("model_fingerprint"),
    }
    args.emit(args, result, _train_text)


def _train_text(r: dict[str, Any]) -> str:
    down = r.get("downstream") or {}
    lines = [f"{r['kind']} dictionary, {r['width']} latents on {r['site']} ({r['model']}): wrote {r['path']}",
             f"  l0 {r['l0']}, explained variance {r['explained_variance']}, mse {r['mse']}",
             f"  dead {r['dead']} ({r['dead_fraction']}), dense {r['dense']} ({r['dense_fraction']}) of {r['width']}"]
    if down:
        lines.append(f"  {down.get('metric')}: clean {down.get('clean')}, spliced {down.get('spliced')}, "
                     f"zero-ablated {down.get('ablated')}, recovered {down.get('recovered')}")
        acc = down.get("accuracy")
        if isinstance(acc, dict):
            lines.append(f"  accuracy: clean {acc.get('clean')}, spliced {acc.get('spliced')}, zero-ablated {acc.get('ablated')}")
    tp = r.get("throughput") or {}
    if tp:
        lines.append(f"  trained at {tp.get('activations_per_second')} activations/s (optimizer alone "
                     f"{tp.get('optimizer_activations_per_second')}/s)")
    elif r.get("cached"):
        lines.append("  (from the cache)")
    return "\n".join(lines)


def _dictionary(args: argparse.Namespace, handle: Any) -> Any:
    from workbench.dictionaries.ground_truth import check_dictionary_fits
    from workbench.dictionaries.sae import SparseDictionary

    d = SparseDictionary.load(args.sae, device=handle.device)
    check_dictionary_fits(handle, d, site=args.site)
    return d


def _features(args: argparse.Namespace) -> None:
    from workbench.dictionaries.ground_truth import (
        ground_truth_table,
        load_labelled_examples,
        trigger_search,
        world_examples,
    )

    examples = load_labelled_examples(args.labels) if args.labels else None
    handle = _load(args)
    d = _dictionary(args, handle)
    if examples is None:
        examples = world_examples(handle, n_clean=args.n, n_per_trojan=args.n_per_trojan, seed=args.seed)
    table = ground_truth_table(handle, d, examples, n_bootstrap=args.bootstrap, seed=args.seed, progress=not args.json)
    result = table.to_json()
    result.update({"model": args.model, "sae": args.sae, "kind": d.kind, "width": d.d_sae})
    if args.blind:
        result["trigger_search"] = trigger_search(handle, d, table, seed=args.seed + 1, progress=not args.json)
    args.emit(args, result, _features_text(table))


def _features_text(table: Any) -> Callable[[dict[str, Any]], str]:
    def text(r: dict[str, Any]) -> str:
        lines = [f"{r['kind']} dictionary ({r['width']} latents) at {r['site']}: test AUROC on {r['n_test']} held-out examples",
                 table.text()]
        for s in r.get("trigger_search", []):
            lines.append(f"trojan {s['trojan']} -> {s['target']}: trigger latent {s['trigger_latent']} "
                         f"(AUROC {s['trigger_latent_auroc']}) ranks {s['rank']} of {s['n_latents']} by effect on the target logit")
        return "\n".join(lines)

    return text


def _quality(args: argparse.Namespace) -> None:
    from workbench.dictionaries.activations import default_source, read_corpus
    from workbench.dictionaries.quality import dictionary_quality

    corpus = read_corpus(args.corpus) if args.corpus else None
    handle = _load(args)
    d = _dictionary(args, handle)
    source = default_source(handle, seed=args.seed, corpus=corpus)
    q = dictionary_quality(handle, d, source=source, n_activations=args.n_activations, seed=args.seed, progress=not args.json)
    result = {"model": args.model, "sae": args.sae, "site": d.config.hook_name, "kind": d.kind, "width": d.d_sae,
              **q.to_json()}
    args.emit(args, result, lambda r: (f"{r['kind']} dictionary at {r['site']}: l0 {r['l0']}, explained variance "
                                       f"{r['explained_variance']}, dead {r['dead']}, dense {r['dense']} of {r['width']}; "
                                       f"downstream {r['downstream']}"))


def _ablate(args: argparse.Namespace) -> None:
    from editors.latent_edit import LatentAblation, LatentRequest

    latents = tuple(int_list(args.latent, "--latent", "latent indices"))
    out = new_file(args.out or "sae-ablate.delta.safetensors", "--out")
    handle = _load(args)
    d = _dictionary(args, handle)
    mean = _clean_mean(handle, d.config.hook_name, args) if args.value == "mean" else None
    delta = LatentAblation(value=args.value).fit(handle, LatentRequest(d, latents, mean=mean))
    result: dict[str, Any] = {"model": args.model, "sae": args.sae, "site": d.config.hook_name, "latents": list(latents),
                              "value": args.value, "rank": delta.extra.get("rank"), "module": delta.extra.get("module"),
                              "changed": delta.names}
    if args.trojan:
        result.update(_trojan_effect(handle, d, latents, delta, args, mean))
    result["delta_path"] = str(delta.save(out))
    args.emit(args, result, _ablate_text)


def _steer(args: argparse.Namespace) -> None:
    from editors.latent_edit import LatentRequest, LatentSteering

    latents = tuple(int_list(args.latent, "--latent", "latent indices"))
    out = new_file(args.out or "sae-steer.delta.safetensors", "--out")
    handle = _load(args)
    d = _dictionary(args, handle)
    delta = LatentSteering(strength=args.strength).fit(handle, LatentRequest(d, latents))
    result = {"model": args.model, "sae": args.sae, "site": delta.extra.get("site"), "param": delta.extra.get("param"),
              "latents": list(latents), "strength": args.strength, "norm": delta.extra.get("norm"),
              "delta_path": str(delta.save(out))}
    args.emit(args, result, lambda r: (f"added {r['strength']} x latents {r['latents']}' directions to {r['param']} "
                                       f"(site {r['site']}, norm {r['norm']:.4g})\n  delta: {r['delta_path']}"))


def _clean_mean(handle: Any, site: str, args: argparse.Namespace) -> Any:
    """The site's mean per feature on clean inputs (ShapesWorld's clean scenes, else the model's corpus), seed + 2000."""
    from workbench.dictionaries.activations import default_source, is_shapes_model, stream_rows, world_source

    seed = args.seed + 2000
    source = world_source(handle, seed=seed, triggered=False) if is_shapes_model(handle) else default_source(handle, seed=seed)
    total, count = None, 0
    for _index, rows in stream_rows(handle, [site], source, stop=args.mean_chunks):
        part = rows[0].double().sum(dim=0)
        total, count = (part if total is None else total + part), count + rows[0].shape[0]
    return total / count


def _trojan_effect(handle: Any, d: Any, latents: tuple[int, ...], delta: Any, args: argparse.Namespace,
                   mean: Any = None) -> dict[str, Any]:
    """Attack success and clean accuracy on the trojan-surgery protocol's evaluation scenes (seed + 1000), before
    and after, and after as many random latents (the control), in `args.draws` seeded draws."""
    from editors.latent_edit import projection_hook, random_latents
    from workbench_protocols.surgery import (EvaluationConfig, SelectionConfig, SurgeryConfig, edit_beside_controls,
                                             prepare_case)

    config = SurgeryConfig(selection=SelectionConfig(n_select=1, n_ref=1),
                           evaluation=EvaluationConfig(n_eval=args.n_eval, n_clean=args.n_clean), seed=args.seed)
    case = prepare_case(handle, args.trojan, config)
    draws = [random_latents(d, len(latents), exclude=latents, seed=args.seed * 1000 + draw) for draw in range(args.draws)]
    out = {"trojan": args.trojan, **edit_beside_controls(
        case, delta, [("latents", chosen, projection_hook(handle, d, chosen, mean)) for chosen in draws])}
    out.update({"n_eval": args.n_eval, "n_clean": args.n_clean, "seed": args.seed})
    return out


def _ablate_text(r: dict[str, Any]) -> str:
    to = "their clean mean" if r["value"] == "mean" else "zero"
    lines = [f"set latents {r['latents']}' directions (rank {r['rank']}) at {r['site']} to {to}, folded into "
             f"{', '.join(r['changed'])}"]
    if "asr_before" in r:
        from workbench_protocols.surgery import beside_controls_lines

        lines += beside_controls_lines(r, "random latents")
    lines.append(f"  delta: {r['delta_path']}")
    return "\n".join(lines)


def add_parsers(sub: Any, common: Callable[[argparse.ArgumentParser], None], emit: Callable[..., None]) -> None:
    sae = sub.add_parser("sae", help="sparse dictionaries (SAEs, transcoders): train, judge against ground truth")
    sae_sub = sae.add_subparsers(dest="sae_command", metavar="ACTION", parser_class=type(sae))
    sae_sub.required = True

    def base(name: str, helptext: str, func: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        p = sae_sub.add_parser(name, help=helptext)
        p.add_argument("model", help="zoo:shapesnet, zoo:factgpt, minilm, a local Hugging Face folder or a hub name")
        p.add_argument("--seed", type=seed_int, default=0)
        p.add_argument("--threads", type=threads, default=None, help="torch CPU threads")
        common(p)
        p.set_defaults(func=func, emit=emit)
        return p

    p = base("train", "train a dictionary on a site (streamed, resumable, cached by model fingerprint)", _train)
    p.add_argument("--site", required=True, help="the site it reads (a transcoder: its input, see --site-out)")
    p.add_argument("--out", required=True, help="new folder for cfg.json + sae_weights.safetensors (SAELens's format)")
    p.add_argument("--kind", default="topk", choices=KINDS)
    p.add_argument("--width", type=positive_int, default=None, help="number of latents (default: --expansion x d_in)")
    p.add_argument("--expansion", type=positive_int, default=8)
    p.add_argument("--k", type=positive_int, default=None, help="TopK: active latents per activation (default min(64, d_in/4))")
    p.add_argument("--sparsity", type=finite_float, default=None, help="L1 (relu, transcoder) or L0 (jumprelu) coefficient")
    p.add_argument("--n-activations", type=positive_int, default=1_048_576, help="activations trained on")
    p.add_argument("--batch-size", type=positive_int, default=1024)
    p.add_argument("--lr", type=finite_float, default=3e-3)
    p.add_argument("--site-out", default=None, help="transcoder: the site it predicts (default: the other side of --site's module)")
    p.add_argument("--corpus", default=None, help="texts for a model without a world: one per line, or a JSON list")
    p.add_argument("--eval-activations", type=positive_int, default=65_536, help="held-out activations for the quality figures")
    p.add_argument("--no-cache", action="store_true", help="train afresh without reading or writing the cache")

    p = base("features", "each known feature's best latent vs difference-in-means vs a probe (AUROC, bootstrap CIs)", _features)
    p.add_argument("--sae", required=True, help="a dictionary folder (written here or by SAELens)")
    p.add_argument("--labels", default=None, help='labelled examples: JSON {"texts": [...], "labels": {"feature": [0/1, ...]}} '
                                                  'or safetensors with "images" and "label:NAME" tensors')
    p.add_argument("--site", default=None, help="refuse the dictionary unless it was trained on this site")
    p.add_argument("--n", type=positive_int, default=2000, help="world examples: clean scenes or prompts")
    p.add_argument("--n-per-trojan", type=positive_int, default=300, help="ShapesWorld: triggered scenes per trojan")
    p.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--blind", action="store_true", help="ShapesNet: rank latents by effect on each trojan's target logit")

    p = base("ablate", "project latents' decoder directions out of their site, as a weight delta", _ablate)
    p.add_argument("--sae", required=True, help="a dictionary folder trained on this model")
    p.add_argument("--latent", required=True, help="latent indices, comma-separated (e.g. 21 or 21,84)")
    p.add_argument("--site", default=None, help="refuse the dictionary unless it was trained on this site")
    p.add_argument("--out", default=None, help="delta file (default ./sae-ablate.delta.safetensors; never overwritten)")
    p.add_argument("--trojan", default=None, help="ShapesNet: measure this trojan's attack success and clean accuracy "
                                                  "before and after, beside as many random latents")
    p.add_argument("--n-eval", type=positive_int, default=500, help="--trojan: triggered evaluation scenes")
    p.add_argument("--n-clean", type=positive_int, default=1000, help="--trojan: clean evaluation scenes")
    p.add_argument("--draws", type=positive_int, default=3, help="--trojan: random-latent control draws")
    p.add_argument("--value", choices=("zero", "mean"), default="zero",
                   help="zero: remove the directions; mean: keep their clean mean (folded into a bias, or the "
                        "BatchNorm after a bias-free conv)")
    p.add_argument("--mean-chunks", type=positive_int, default=4,
                   help="--value mean: chunks of clean inputs the mean is taken over (ShapesWorld: 128 scenes each)")

    p = base("steer", "add a strength x latents' decoder directions to the bias that writes their site", _steer)
    p.add_argument("--sae", required=True, help="a dictionary folder trained on this model")
    p.add_argument("--latent", required=True, help="latent indices, comma-separated")
    p.add_argument("--strength", type=finite_float, required=True, help="activation units along the unit direction")
    p.add_argument("--site", default=None, help="refuse the dictionary unless it was trained on this site")
    p.add_argument("--out", default=None, help="delta file (default ./sae-steer.delta.safetensors; never overwritten)")

    p = base("quality", "l0, explained variance, spliced-in loss/accuracy, dead and dense latents", _quality)
    p.add_argument("--sae", required=True)
    p.add_argument("--site", default=None, help="refuse the dictionary unless it was trained on this site")
    p.add_argument("--corpus", default=None)
    p.add_argument("--n-activations", type=positive_int, default=65_536)
