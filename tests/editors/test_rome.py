"""ROME on tiny GPT-2, GPT-NeoX and Llama (shapes, layout, invariants, effect) and on FactGPT (slow)."""

from __future__ import annotations

import random

import pytest
import torch

from editors.mlp_update import key_statistics
from editors.rome import ROME
from tests.conftest import WORDS
from workbench.counterfact import aggregate_cases, evaluate_rewrites
from workbench.delta import LowRank
from workbench.errors import WorkbenchError
from workbench.fingerprint import model_fingerprint
from workbench.requests import Rewrite
from workbench.storage import cache_dir

FAMILIES = ("gpt2", "gpt_neox", "llama")


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(n)]


def rewrite(subject: str = "vel oran") -> Rewrite:
    return Rewrite(prompt="the capital of {} is", subject=subject, target_new="paris", target_true="rome",
                   paraphrase_prompts=("one two the capital of " + subject + " is",),
                   neighborhood_prompts=("the capital of tal mira is",))


# Tiny random models write tiny MLP outputs, so the edit needs loose clamps to show an effect.
TINY = dict(layer=0, n_prefixes=2, prefix_length=3, mom2_n_samples=2000, v_steps=30, kl_factor=0.0,
            v_weight_decay=0.0, clamp_norm_factor=1000.0, max_update_ratio=1e6)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))


def _p_new(h, rw):
    return evaluate_rewrites(h, [rw], fluency=False, bootstrap=0).per_case[0]["rewrite_p_new"]


@pytest.mark.parametrize("family", FAMILIES)
def test_rome_tiny(load_tiny, family: str) -> None:
    h = load_tiny(family)
    rw = rewrite()
    before_fp = model_fingerprint(h.model)
    before_state = {k: v.clone() for k, v in h.model.state_dict().items()}
    p_before = _p_new(h, rw)
    delta = ROME(**TINY).fit(h, rw, texts=corpus())
    assert model_fingerprint(h.model) == before_fp  # fitting never changes the model
    name = h.arch.site_map.weight_name(h.model, "mlp_out", 0)
    assert delta.names == [name]
    change = delta.changes[name]
    param = dict(h.model.named_parameters())[name]
    assert isinstance(change, LowRank) and change.rank == 1 and change.shape == tuple(param.shape)
    d_model, d_mlp = h.arch.d_model, h.arch.d_mlp
    # The rank-one factor along the keys (d_mlp) is u for GPT-2's (in, out) Conv1D and v for nn.Linear.
    assert change.u.shape[0] == (d_mlp if family == "gpt2" else d_model)
    assert delta.extra["denominator"] > 0 and delta.extra["update_norm"] > 0
    with delta.applied(h.model):
        p_after = _p_new(h, rw)
    assert p_after > p_before
    for k, v in h.model.state_dict().items():
        assert torch.equal(v, before_state[k]), k  # revert is bit-exact
    assert model_fingerprint(h.model) == before_fp


class _NoReplay:
    """BlocksReplayed that never replays: every block computes on every step."""

    def __init__(self, *_args) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        pass

    def recorded(self) -> None:
        pass


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_below_the_edit_replay_to_the_same_bits(load_tiny, family: str, monkeypatch) -> None:
    import editors.mlp_update as mlp_update

    h = load_tiny(family)
    rome = ROME(**{**TINY, "layer": 1, "v_steps": 6})
    blocks = h.model.get_submodule(h.arch.site_map.module_path(h.model, h.arch.site_map.layers, None))
    calls = {0: 0, 1: 0}
    for i in calls:
        blocks[i].register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
    replayed = rome.fit(h, rewrite(), texts=corpus())
    block0, block1 = calls[0], calls[1]
    assert replayed.extra["v_steps_taken"] == 6 and block1 - block0 >= 6  # block 0 skipped on most steps
    originals = list(blocks)
    assert all(a is b for a, b in zip(blocks, originals))  # the real blocks are back
    monkeypatch.setattr(mlp_update, "BlocksReplayed", _NoReplay)
    computed = rome.fit(h, rewrite(), texts=corpus())
    name = replayed.names[0]
    assert torch.equal(replayed.changes[name].u, computed.changes[name].u)
    assert torch.equal(replayed.changes[name].v, computed.changes[name].v)


def test_blocks_are_restored_when_a_step_fails(load_tiny, monkeypatch) -> None:
    import editors.mlp_update as mlp_update

    h = load_tiny("gpt2")
    blocks = list(h.model.transformer.h)
    steps = {"n": 0}
    real = mlp_update._logits_at

    def failing(*args, **kwargs):
        steps["n"] += 1
        if steps["n"] == 3:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(mlp_update, "_logits_at", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        ROME(**{**TINY, "layer": 1}).fit(h, rewrite(), texts=corpus())
    assert all(a is b for a, b in zip(h.model.transformer.h, blocks))


def test_rank_one_maps_key_to_value(load_tiny) -> None:
    """The update adds exactly delta_v to the MLP output for the averaged key k*."""
    from editors.mlp_update import context_templates, subject_keys

    h = load_tiny("gpt2")
    cfg = ROME(**TINY)
    rw = rewrite()
    delta = cfg.fit(h, rw, texts=corpus())
    templates = context_templates(h, n_prefixes=cfg.n_prefixes, length=cfg.prefix_length, seed=cfg.seed)
    k = subject_keys(h, 0, [rw], templates)[0].double()
    change = delta.dense(delta.names[0]).double()  # (d_in, d_out) for Conv1D
    moved = k @ change
    assert float(moved.norm()) == pytest.approx(delta.extra["delta_v_norm"], rel=1e-3)


def test_degenerate_denominator_refused_or_clamped(load_tiny) -> None:
    h = load_tiny("llama")
    rw = rewrite()
    strict = dict(TINY, min_denominator=1e9)
    with pytest.raises(WorkbenchError, match="degenerate.*denominator"):
        ROME(**strict).fit(h, rw, texts=corpus())
    fp = model_fingerprint(h.model)
    clamped = ROME(**dict(strict, on_degenerate="clamp")).fit(h, rw, texts=corpus())
    assert clamped.extra["clamped"] is True
    assert clamped.extra["denominator"] == pytest.approx(1e9 * h.arch.d_mlp)
    free = ROME(**TINY).fit(h, rw, texts=corpus())
    assert clamped.norms()[clamped.names[0]] < free.norms()[free.names[0]]
    capped = ROME(**dict(TINY, max_update_ratio=1e-3, on_degenerate="clamp")).fit(h, rw, texts=corpus())
    assert capped.extra["update_ratio"] == pytest.approx(1e-3, rel=1e-3)
    assert model_fingerprint(h.model) == fp


def test_second_edit_reuses_statistics(load_tiny, tmp_path) -> None:
    h = load_tiny("gpt_neox")
    cfg = ROME(**TINY)
    texts = corpus(400)
    first = cfg.fit(h, rewrite(), texts=texts)
    files = sorted((tmp_path / "cache" / "stats").glob("*.safetensors"))
    assert len(files) == 1
    second = cfg.fit(h, rewrite("tal mira"), texts=texts)
    assert sorted((tmp_path / "cache" / "stats").glob("*.safetensors")) == files
    assert second.extra["statistics_samples"] == first.extra["statistics_samples"]


def test_rome_uses_the_statistics_it_is_given(load_tiny, tmp_path) -> None:
    """Edits applied one after another can keep the unedited model's statistics: no new ones are collected."""
    h = load_tiny("gpt2")
    cfg = ROME(**TINY)
    unedited = {0: key_statistics(h, 0, texts=corpus(), n_samples=cfg.mom2_n_samples)}
    other = {0: key_statistics(h, 0, texts=corpus(seed=1), n_samples=cfg.mom2_n_samples)}
    first = cfg.fit(h, rewrite(), texts=corpus())
    assert torch.equal(cfg.fit(h, rewrite(), statistics=unedited).dense(first.names[0]), first.dense(first.names[0]))
    assert not torch.allclose(cfg.fit(h, rewrite(), statistics=other).dense(first.names[0]), first.dense(first.names[0]))
    files = sorted((tmp_path / "cache" / "stats").glob("*.safetensors"))
    with first.applied(h.model):
        second = cfg.fit(h, rewrite("tal mira"), statistics=unedited)
    assert sorted((tmp_path / "cache" / "stats").glob("*.safetensors")) == files
    assert second.extra["statistics_samples"] == unedited[0].count


def test_without_mom2_adjustment(load_tiny) -> None:
    h = load_tiny("gpt2")
    delta = ROME(**dict(TINY, mom2_adjustment=False)).fit(h, rewrite())
    assert delta.extra["statistics_samples"] == 0
    # With C = I the key-side factor is k* itself.
    assert delta.extra["denominator"] == pytest.approx(float(delta.changes[delta.names[0]].u.double().norm() ** 2), rel=1e-4)


def test_bad_requests(load_tiny) -> None:
    h = load_tiny("gpt2")
    with pytest.raises(WorkbenchError, match="out of range"):
        ROME(**dict(TINY, layer=7)).fit(h, rewrite(), texts=corpus())
    with pytest.raises(WorkbenchError, match="one fact at a time"):
        ROME(**TINY).fit(h, [rewrite(), rewrite("tal mira")], texts=corpus())
    with pytest.raises(WorkbenchError, match="MLP mapping|causal"):
        ROME(**TINY).fit(load_tiny("bert"), rewrite(), texts=corpus())
    with pytest.raises(WorkbenchError, match="on_degenerate"):
        ROME(on_degenerate="ignore")  # type: ignore[arg-type]


# The zoo model lives in the user's cache (trained once, shared by every test); the autouse
# fixture above points WORKBENCH_CACHE at a private folder only for key statistics, so the
# shared path is taken here, at import, before any fixture runs.
SHARED_CACHE = cache_dir()


@pytest.mark.slow
def test_rome_factgpt_quality() -> None:
    """Issue 3's ROME target on FactGPT v2 with the paper's key (subject's last token, layer 0 from the trace).

    Measured on these 10 rewrites: ES 100, PS 100, NS 98, S 99.3 (100 rewrites in benchmarks/RESULTS.md).
    """
    from workbench import zoo

    h = zoo.load("factgpt", device="cpu", progress=False, cache=SHARED_CACHE)
    world = h.info["world"]
    rewrites = [Rewrite.from_counterfact(r) for r in world.counterfact_records(10, seed=11)]
    base = evaluate_rewrites(h, rewrites, fluency=False, bootstrap=0).aggregate
    cfg = ROME(**FACTGPT_ROME)
    cases = []
    for rw in rewrites:
        delta = cfg.fit(h, rw)
        with delta.applied(h.model):
            cases += evaluate_rewrites(h, [rw], fluency=False, bootstrap=0).per_case
    edited = aggregate_cases(cases)
    assert base["ES"] <= 20 and base["NS"] >= 95
    assert edited["ES"] >= 99
    assert edited["PS"] >= 90
    assert edited["NS"] >= base["NS"] - 3
    assert edited["S"] >= 95


FACTGPT_ROME = dict(layer=0, fact_token="subject_last", n_prefixes=0)


def test_second_moment_factor_is_reused_only_for_the_same_unchanged_tensor() -> None:
    from editors import mlp_update

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64)
    c = x.T @ x / 200
    rhs = torch.randn(16, 3, generator=g, dtype=torch.float64)
    calls = []
    real = torch.linalg.cholesky_ex

    def counting(a, *args, **kwargs):
        calls.append(a.shape)
        return real(a, *args, **kwargs)

    import unittest.mock

    with unittest.mock.patch.object(torch.linalg, "cholesky_ex", counting):
        first = mlp_update.solve_second_moment(c, rhs)
        again = mlp_update.solve_second_moment(c, rhs)
        assert len(calls) == 1 and torch.equal(first, again)
        c.mul_(2.0)  # changed in place: the kept factor no longer applies
        halved = mlp_update.solve_second_moment(c, rhs)
        assert len(calls) == 2
        torch.testing.assert_close(halved, first / 2)
        other = c.clone()
        mlp_update.solve_second_moment(other, rhs)
        assert len(calls) == 3
    direct = torch.linalg.solve(c + 1e-6 * torch.diagonal(c).mean() * torch.eye(16, dtype=c.dtype), rhs)
    torch.testing.assert_close(halved, direct)
