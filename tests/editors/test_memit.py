"""MEMIT on tiny GPT-2, GPT-NeoX and Llama (shapes, layouts, invariants, effect) and on FactGPT (slow)."""

from __future__ import annotations

import random

import pytest
import torch

from editors.memit import MEMIT, default_layers, key_write_shares
from editors.mlp_update import key_statistics
from tests.conftest import WORDS
from workbench.counterfact import evaluate_rewrites
from workbench.delta import LowRank
from workbench.errors import WorkbenchError
from workbench.fingerprint import model_fingerprint
from workbench.requests import Rewrite
from workbench.storage import cache_dir

FAMILIES = ("gpt2", "gpt_neox", "llama")
SUBJECTS = ("vel oran", "tal mira", "red fox", "blue cat")
TINY = dict(layers=(0,), n_prefixes=2, prefix_length=3, mom2_n_samples=2000, mom2_update_weight=100.0, v_steps=20,
            kl_factor=0.0, v_weight_decay=0.0, clamp_norm_factor=10.0)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n)]


def rewrites() -> list[Rewrite]:
    return [Rewrite(prompt="the capital of {} is", subject=s, target_new="paris", target_true="rome") for s in SUBJECTS]


def test_default_layers() -> None:
    assert default_layers(28) == (3, 4, 5, 6, 7, 8)  # GPT-J, as in the paper
    assert default_layers(4) == (0, 1)
    assert default_layers(1) == (0,)
    assert all(0 <= x < n for n in range(1, 50) for x in default_layers(n))


def test_key_write_shares_see_separable_and_shared_keys() -> None:
    g = torch.Generator().manual_seed(0)
    d = 16
    basis = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    edited, orthogonal = basis[:4] * 3, basis[4:8] * 3
    c = torch.eye(d) / d
    sep = key_write_shares(edited, orthogonal, c, 1e-6)
    assert sep["self"] == pytest.approx(1.0, abs=1e-4) and sep["leak"] < 1e-5
    # an untouched key that is an edited key plus a little noise receives that key's share
    twins = edited + 0.05 * torch.randn(4, d, generator=g)
    shared = key_write_shares(edited, twins, c, 1e-6)
    assert shared["leak"] > 0.9
    # a stronger prior (lambda) writes less of each residual and leaks less
    strong = key_write_shares(edited, twins, c, 50.0)
    assert strong["self"] < sep["self"] and strong["leak"] < shared["leak"]


@pytest.mark.parametrize("family", FAMILIES)
def test_memit_tiny(load_tiny, family: str) -> None:
    h = load_tiny(family)
    rws = rewrites()
    fp = model_fingerprint(h.model)
    state = {k: v.clone() for k, v in h.model.state_dict().items()}
    before = [c["rewrite_p_new"] for c in evaluate_rewrites(h, rws, fluency=False, bootstrap=0).per_case]
    # The last layer of a 2-layer model reaches the prediction only at the prompt's last token.
    delta = MEMIT(**dict(TINY, layers=(0, 1), fact_token="prompt_last")).fit(h, rws, texts=corpus())
    assert model_fingerprint(h.model) == fp  # fitting never changes the model
    names = [h.arch.site_map.weight_name(h.model, "mlp_out", layer) for layer in (0, 1)]
    assert delta.names == sorted(names)
    params = dict(h.model.named_parameters())
    for name in names:
        change = delta.changes[name]
        assert isinstance(change, LowRank) and change.rank == len(rws)
        assert change.shape == tuple(params[name].shape)
        assert change.u.shape[0] == (h.arch.d_mlp if family == "gpt2" else h.arch.d_model)
    with delta.applied(h.model):
        after = [c["rewrite_p_new"] for c in evaluate_rewrites(h, rws, fluency=False, bootstrap=0).per_case]
    assert sum(after) > sum(before)
    for k, v in h.model.state_dict().items():
        assert torch.equal(v, state[k]), k  # revert is bit-exact


def test_memit_dense_equals_low_rank(load_tiny) -> None:
    h = load_tiny("llama")
    low = MEMIT(**TINY).fit(h, rewrites(), texts=corpus())
    dense = MEMIT(**dict(TINY, storage="dense")).fit(h, rewrites(), texts=corpus())
    name = low.names[0]
    assert isinstance(dense.changes[name], torch.Tensor)
    assert torch.allclose(low.dense(name), dense.changes[name], atol=1e-5)


def test_memit_single_layer_fits_the_targets(load_tiny) -> None:
    """With one layer and lambda -> 0, the update maps each key to its residual exactly (least squares)."""
    from editors.mlp_update import context_templates, subject_keys

    h = load_tiny("gpt_neox")
    cfg = MEMIT(**dict(TINY, mom2_update_weight=1e-6))
    rws = rewrites()
    delta = cfg.fit(h, rws, texts=corpus())
    templates = context_templates(h, n_prefixes=cfg.n_prefixes, length=cfg.prefix_length, seed=cfg.seed)
    keys = subject_keys(h, 0, rws, templates).double()
    moved = keys @ delta.dense(delta.names[0]).double().T  # out_in layout
    assert float(moved.norm(dim=1).min()) > 0
    assert delta.extra["per_layer"][0]["residual_norm"] == pytest.approx(float(moved.norm(dim=1).mean()), rel=0.05)
    assert delta.extra["per_layer"][0]["self_share"] == pytest.approx(1.0, abs=1e-3)  # every key gets its whole residual
    strong = MEMIT(**dict(TINY, mom2_update_weight=1e4)).fit(h, rws, texts=corpus())
    assert 0 < strong.extra["per_layer"][0]["self_share"] < 0.5  # a strong prior writes only part of each


@pytest.mark.parametrize("layers", [(0,), (0, 1)])
def test_memit_uses_the_statistics_it_is_given(load_tiny, layers) -> None:
    """Precomputed statistics give the same edit as the ones fit collects; other statistics a different one."""
    h = load_tiny("llama")
    cfg = MEMIT(**dict(TINY, layers=layers, storage="dense", fact_token="prompt_last"))
    own = {layer: key_statistics(h, layer, texts=corpus(), n_samples=cfg.mom2_n_samples) for layer in layers}
    other = {layer: key_statistics(h, layer, texts=corpus(seed=1), n_samples=cfg.mom2_n_samples) for layer in layers}
    fitted = cfg.fit(h, rewrites(), texts=corpus())
    given = cfg.fit(h, rewrites(), statistics=own)
    moved = cfg.fit(h, rewrites(), statistics=other)
    for name in fitted.names:
        assert torch.equal(given.dense(name), fitted.dense(name))
        assert not torch.equal(moved.dense(name), fitted.dense(name))
    with pytest.raises(WorkbenchError, match="key_statistics"):
        cfg.fit(h, rewrites(), statistics={0: torch.eye(32)})


def test_memit_bad_input(load_tiny) -> None:
    h = load_tiny("gpt2")
    with pytest.raises(WorkbenchError, match="out of range"):
        MEMIT(**dict(TINY, layers=(0, 5))).fit(h, rewrites(), texts=corpus())
    with pytest.raises(WorkbenchError, match="at least one"):
        MEMIT(**TINY).fit(h, [], texts=corpus())
    with pytest.raises(WorkbenchError, match="storage"):
        MEMIT(storage="sparse")  # type: ignore[arg-type]


# The shared zoo cache, taken at import before the autouse fixture redirects WORKBENCH_CACHE.
SHARED_CACHE = cache_dir()


@pytest.mark.slow
def test_memit_factgpt_50() -> None:
    """FactGPT v2, subject-last keys at layer 0 (measured on these 50: ES 100, PS 92, NS 96.2, S 96.0).

    The issue-3 target (S >= 90 with 500 edits) is not met (benchmarks/RESULTS.md, "FactGPT v2").
    """
    from workbench import zoo

    h = zoo.load("factgpt", device="cpu", progress=False, cache=SHARED_CACHE)
    rws = [Rewrite.from_counterfact(r) for r in h.info["world"].counterfact_records(50, seed=5)]
    delta = MEMIT(layers=(0,), n_prefixes=0, clamp_norm_factor=1.5).fit(h, rws)
    with delta.applied(h.model):
        agg = evaluate_rewrites(h, rws, fluency=False, bootstrap=0).aggregate
    assert agg["ES"] >= 95
    assert agg["NS"] >= 90
    assert agg["S"] >= 90
