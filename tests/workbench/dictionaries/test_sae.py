"""The dictionary: each kind's nonlinearity, SAELens's file layout, bit-exact save and load, and refusals."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from workbench.dictionaries.sae import CFG_FILE, WEIGHTS_FILE, DictionaryConfig, SparseDictionary, from_rows, site_rows
from workbench.errors import CorruptFileError, UnsafeFileError, WorkbenchError


def _dict(kind: str, *, d_in: int = 12, d_sae: int = 40, seed: int = 0) -> SparseDictionary:
    config = DictionaryConfig(kind=kind, d_in=d_in, d_sae=d_sae, k=4 if kind == "topk" else None,  # type: ignore[arg-type]
                              d_out=7 if kind == "transcoder" else None,
                              apply_b_dec_to_input=kind != "transcoder", hook_name="blocks.1.hook_resid_post",
                              model_name="m", metadata={"site": "blocks.1.hook_resid_post"})
    d = SparseDictionary(config, seed=seed)
    with torch.no_grad():
        d.b_enc.copy_(torch.linspace(-0.05, 0.05, d_sae))
        if kind == "jumprelu":
            d.threshold.fill_(0.02)
    return d


X = torch.randn(50, 12, generator=torch.Generator().manual_seed(1))


def test_topk_keeps_exactly_k_latents_and_relu_and_jumprelu_follow_their_rules() -> None:
    topk = _dict("topk")
    acts = topk.encode(X)
    assert ((acts != 0).sum(-1) <= 4).all() and ((acts != 0).sum(-1) == 4).float().mean() > 0.9
    pre = topk.pre_activations(X)
    kept = torch.topk(pre, 4, dim=-1).indices
    assert torch.equal(acts.gather(-1, kept), pre.gather(-1, kept).relu())
    relu = _dict("relu")
    assert torch.equal(relu.encode(X), relu.pre_activations(X).relu())
    jump = _dict("jumprelu")
    pre = jump.pre_activations(X)
    assert torch.equal(jump.encode(X), torch.where(pre > 0.02, pre, torch.zeros_like(pre)))
    transcoder = _dict("transcoder")
    assert transcoder(X).shape == (50, 7)


@pytest.mark.parametrize("kind", ["relu", "topk", "jumprelu", "transcoder"])
def test_save_and_load_are_bit_exact_in_saelens_layout(kind: str, tmp_path: Path) -> None:
    d = _dict(kind, seed=5)
    folder = d.save(tmp_path / "d")
    cfg = json.loads((folder / CFG_FILE).read_text())
    expected_arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "transcoder": "transcoder"}[kind]
    assert cfg["architecture"] == expected_arch and cfg["d_in"] == 12 and cfg["d_sae"] == 40
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["metadata"]["model_name"] == "m"
    assert cfg["metadata"]["workbench"] == {"site": "blocks.1.hook_resid_post"}
    assert (cfg.get("k") == 4) == (kind == "topk") and (cfg.get("d_out") == 7) == (kind == "transcoder")
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_FILE), "pt") as fh:
        names = set(fh.keys())
    assert names == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if kind == "jumprelu" else set())
    back = SparseDictionary.load(folder)
    assert back.config == d.config
    for name, tensor in d.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name
    assert torch.equal(back(X), d(X))


def test_save_never_overwrites_and_load_refuses_bad_folders(tmp_path: Path) -> None:
    d = _dict("relu")
    folder = d.save(tmp_path / "d")
    with pytest.raises(FileExistsError, match="never overwritten"):
        d.save(folder)
    with pytest.raises(WorkbenchError, match="not a folder"):
        SparseDictionary.load(tmp_path / "none")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / CFG_FILE).write_text((folder / CFG_FILE).read_text())
    (pickled / WEIGHTS_FILE).write_bytes(pickle.dumps({"W_enc": [1.0]}))
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        SparseDictionary.load(pickled)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / CFG_FILE).write_text((folder / CFG_FILE).read_text())
    weights = d.weights()
    save_file({**weights, "W_enc": weights["W_enc"][:, :10].contiguous()}, str(wrong / WEIGHTS_FILE))
    with pytest.raises(CorruptFileError, match="W_enc has shape"):
        SparseDictionary.load(wrong)
    save_file({**weights, "extra": torch.zeros(3)}, str(wrong / WEIGHTS_FILE))
    with pytest.raises(WorkbenchError, match="extra"):
        SparseDictionary.load(wrong)
    tampered = tmp_path / "tampered"
    d.save(tampered)
    raw = bytearray((tampered / WEIGHTS_FILE).read_bytes())
    raw[-3] ^= 0xFF  # one flipped byte inside the last tensor: the checksum the workbench wrote catches it
    (tampered / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError):
        SparseDictionary.load(tampered)


@pytest.mark.parametrize("changes, message", [
    ({"kind": "topk", "k": 41}, "1 <= k <= width"),
    ({"kind": "topk", "k": None}, "1 <= k <= width"),
    ({"kind": "relu", "k": 3}, "TopK setting"),
    ({"kind": "relu", "d_sae": 0}, "width=0"),
    ({"kind": "transcoder", "apply_b_dec_to_input": True, "d_out": 7}, "apply_b_dec_to_input must be False"),
    ({"kind": "relu", "d_out": 7}, "only a transcoder"),
    ({"kind": "gated"}, "unknown dictionary kind"),
])
def test_config_refuses_what_no_dictionary_can_be(changes: dict, message: str) -> None:
    base = {"kind": "relu", "d_in": 12, "d_sae": 40}
    with pytest.raises(WorkbenchError, match=message):
        DictionaryConfig(**{**base, **changes})


def test_conv_and_token_sites_become_rows_and_back() -> None:
    conv = torch.randn(2, 5, 3, 4)
    rows, shape = site_rows(conv)
    assert rows.shape == (2 * 3 * 4, 5) and torch.equal(rows[1], conv[0, :, 0, 1])
    assert torch.equal(from_rows(rows, shape), conv)
    tokens = torch.randn(2, 6, 5)
    rows, shape = site_rows(tokens)
    assert rows.shape == (12, 5) and torch.equal(from_rows(rows, shape), tokens)
    d = _dict("relu", d_in=5)
    assert d.encode_site(conv).shape == (2, 40, 3, 4) and d.reconstruct_site(conv).shape == conv.shape


def test_the_same_seed_gives_the_same_dictionary() -> None:
    a, b, c = _dict("topk", seed=4), _dict("topk", seed=4), _dict("topk", seed=5)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.W_dec, c.W_dec)
