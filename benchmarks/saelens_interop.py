"""SAELens's side of the dictionary round trip; runs in the peers environment, where SAELens lives.

    benchmarks/.venv-peers/bin/python benchmarks/saelens_interop.py reconstruct DICT_DIR INPUTS.safetensors OUT.safetensors
    benchmarks/.venv-peers/bin/python benchmarks/saelens_interop.py write KIND D_IN D_SAE OUT_DIR [K]

`reconstruct` opens a dictionary folder with `SAE.load_from_disk` and writes its encoding and
reconstruction of the rows in INPUTS (tensor "x"); `write` saves a SAELens SAE of KIND
(standard, topk, jumprelu) with seeded random weights via `save_model`. The workbench's test
(`tests/workbench/dictionaries/test_saelens_interop.py`) compares both directions with its own
`SparseDictionary`. SAELens does not live in the project's environment (it brings transformer-lens,
wandb and their dependencies), so it is called here, in a subprocess.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file, save_file


def reconstruct(folder: str, inputs: str, out: str) -> None:
    from sae_lens import SAE

    sae = SAE.load_from_disk(folder, device="cpu")
    x = load_file(inputs)["x"]
    with torch.no_grad():
        feats = sae.encode(x)
        recon = sae.decode(feats)
    save_file({"encoded": feats.contiguous(), "reconstruction": recon.contiguous()}, out)


def write(kind: str, d_in: int, d_sae: int, folder: str, k: int | None) -> None:
    import sae_lens

    configs = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": k}),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {})}
    cls, cfg_cls, extra = configs[kind]
    sae = cls(cfg_cls(d_in=d_in, d_sae=d_sae, **extra))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if name == "threshold" else 0.1))
        if kind == "jumprelu":
            sae.threshold.abs_()  # a threshold is positive
    sae.save_model(folder)


if __name__ == "__main__":
    if sys.argv[1] == "reconstruct":
        reconstruct(sys.argv[2], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "write":
        write(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]) if len(sys.argv) > 6 else None)
    else:
        raise SystemExit(f"unknown action {sys.argv[1]!r}; expected reconstruct or write")
