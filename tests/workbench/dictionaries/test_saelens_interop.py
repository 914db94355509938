"""A dictionary saved here opens in SAELens with the same encoding and reconstruction, and SAELens's saved
SAEs open here with SAELens's numbers. SAELens lives in the peers environment (`benchmarks/setup_peers.sh`);
without it these tests skip and say so."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.dictionaries.sae import DictionaryConfig, SparseDictionary

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "saelens_interop.py"
PEERS = Path(os.environ.get("PEERS_VENV", ROOT / "benchmarks" / ".venv-peers"))
PYTHON = PEERS / "bin" / "python"
TOLERANCE = 1e-5


def _has_saelens() -> bool:
    if not PYTHON.is_file():
        return False
    probe = subprocess.run([str(PYTHON), "-c", "import sae_lens"], capture_output=True, timeout=300)
    return probe.returncode == 0


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _has_saelens(), reason=f"SAELens is not installed in {PEERS} "
                                                   "(bash benchmarks/setup_peers.sh installs it)")]


def _peer(*args: str) -> None:
    proc = subprocess.run([str(PYTHON), str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _trained_like(kind: str, seed: int) -> SparseDictionary:
    """A dictionary with non-trivial weights in every tensor (biases and thresholds included)."""
    config = DictionaryConfig(kind=kind, d_in=16, d_sae=48, k=5 if kind == "topk" else None,  # type: ignore[arg-type]
                              hook_name="blocks.0.hook_resid_post", model_name="tiny")
    d = SparseDictionary(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        d.b_enc.copy_(torch.randn(48, generator=g) * 0.05)
        d.b_dec.copy_(torch.randn(16, generator=g) * 0.1)
        if kind == "jumprelu":
            d.threshold.copy_(torch.rand(48, generator=g) * 0.05)
    return d


@pytest.mark.parametrize("kind", ["relu", "topk", "jumprelu"])
def test_saved_here_opens_in_saelens_with_the_same_numbers(kind: str, tmp_path: Path) -> None:
    d = _trained_like(kind, seed=3)
    folder = d.save(tmp_path / "dict")
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(9))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    _peer("reconstruct", str(folder), str(tmp_path / "x.safetensors"), str(tmp_path / "out.safetensors"))
    theirs = load_file(str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        ours_encoded, ours = d.encode(x), d(x)
    assert (ours_encoded != 0).any()  # the comparison is not between two zero maps
    assert (theirs["encoded"] - ours_encoded).abs().max() <= TOLERANCE
    assert (theirs["reconstruction"] - ours).abs().max() <= TOLERANCE


@pytest.mark.parametrize("kind, ours", [("standard", "relu"), ("topk", "topk"), ("jumprelu", "jumprelu")])
def test_saelens_saves_open_here_with_saelens_numbers(kind: str, ours: str, tmp_path: Path) -> None:
    folder = tmp_path / kind
    _peer("write", kind, "16", "48", str(folder), "4")
    d = SparseDictionary.load(folder)
    assert d.kind == ours and d.d_sae == 48
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    _peer("reconstruct", str(folder), str(tmp_path / "x.safetensors"), str(tmp_path / "out.safetensors"))
    theirs = load_file(str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        assert (theirs["encoded"] - d.encode(x)).abs().max() <= TOLERANCE
        assert (theirs["reconstruction"] - d(x)).abs().max() <= TOLERANCE
