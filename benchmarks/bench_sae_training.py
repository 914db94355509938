"""Dictionary training speed: the workbench's trainer beside SAELens's training step, on the same activations.

    .venv/bin/python benchmarks/bench_sae_training.py dump runs/sae-bench/acts.safetensors     # ShapesNet layer2 rows
    benchmarks/.venv-peers/bin/python benchmarks/bench_sae_training.py time runs/sae-bench/acts.safetensors --json

`dump` streams 262,144 activation rows of `zoo:shapesnet`'s `layer2` (32 channels at every position)
from the world, as `workbench sae train` does. `time` runs in the peers environment, where SAELens
lives, and times one optimization step after another on the same batches for both: the
workbench's `DictionaryTrainer.step` and SAELens's `TopKTrainingSAE` step as `SAETrainer._train_step`
makes it (training forward pass with the dead-latent mask, backward, gradient clipping at 1, Adam),
TopK, 256 latents, k 8, batch 1024, lr 3e-3, one thread, best of `--repeats`. Both on the same torch,
so the ratio is of the code, not the build. Streaming activations out of the model is not part of
either figure (`workbench sae train` reports both: with and without streaming).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WIDTH, K, BATCH, LR = 256, 8, 1024, 3e-3


def dump(path: Path, n: int) -> None:
    import workbench as wb
    from workbench.dictionaries.activations import default_source, stream_rows
    from workbench.sites import resolve_site

    handle = wb.load("zoo:shapesnet", device="cpu", progress=False)
    site = resolve_site(handle, "layer2")
    rows, have = [], 0
    for _, (chunk,) in stream_rows(handle, [site], default_source(handle, seed=0)):
        rows.append(chunk)
        have += chunk.shape[0]
        if have >= n:
            break
    mixed = torch.cat(rows)[:n]
    x = mixed[torch.randperm(len(mixed), generator=torch.Generator().manual_seed(0))].float().contiguous()  # as a buffer
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"x": x}, str(path))
    print(f"wrote {tuple(x.shape)} rows of layer2 to {path}")


def _ours(x: torch.Tensor, steps: int) -> float:
    from workbench.dictionaries.sae import DictionaryConfig, SparseDictionary
    from workbench.dictionaries.train import DictionaryTrainer, TrainConfig

    d = SparseDictionary(DictionaryConfig(kind="topk", d_in=x.shape[1], d_sae=WIDTH, k=K), seed=0)
    trainer = DictionaryTrainer(d, TrainConfig(kind="topk", width=WIDTH, k=K, batch_size=BATCH, lr=LR), total_steps=steps)
    start = time.perf_counter()
    for i in range(steps):
        trainer.step(x[i * BATCH:(i + 1) * BATCH])
    return time.perf_counter() - start


def _saelens(x: torch.Tensor, steps: int) -> float:
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=WIDTH, k=K))
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.9, 0.999))
    since_fired = torch.zeros(WIDTH)
    start = time.perf_counter()
    for i in range(steps):
        out = sae.training_forward_pass(step_input=TrainStepInput(
            sae_in=x[i * BATCH:(i + 1) * BATCH], coefficients={}, dead_neuron_mask=since_fired > 200,
            n_training_steps=i, is_logging_step=False))
        with torch.no_grad():
            fired = out.feature_acts.bool().float().sum(-2).bool()
            since_fired += 1
            since_fired[fired] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return time.perf_counter() - start


def time_both(path: Path, repeats: int) -> dict[str, object]:
    torch.set_num_threads(1)
    x = load_file(str(path))["x"]
    steps = x.shape[0] // BATCH
    ours = min(_ours(x, steps) for _ in range(repeats))
    theirs = min(_saelens(x, steps) for _ in range(repeats))
    import sae_lens

    n = steps * BATCH
    return {"rows": n, "steps": steps, "width": WIDTH, "k": K, "batch": BATCH, "threads": 1, "repeats": repeats,
            "torch": torch.__version__, "sae_lens": sae_lens.__version__,
            "ours_rows_per_second": round(n / ours, 1), "saelens_rows_per_second": round(n / theirs, 1),
            "ratio": round(theirs / ours, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=("dump", "time"))
    p.add_argument("path", type=Path)
    p.add_argument("--n", type=int, default=262_144, help="rows to dump")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.action == "dump":
        dump(args.path, args.n)
        return
    result = time_both(args.path, args.repeats)
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
