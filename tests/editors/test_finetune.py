"""FT and FT-L: the model is never changed by fitting, revert is exact, the target moves,
FT-L's change respects its L-infinity bound; FactGPT quality (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from editors.finetune import FineTune, FineTuneL, encode_targets, target_probabilities
from editors.registry import get
from tests.zoo_models import factgpt
from workbench.errors import WorkbenchError
from workbench.fingerprint import model_fingerprint
from workbench.handle import ModelHandle
from workbench.models import load
from workbench.requests import Rewrite

CAUSAL = ("gpt2", "gpt_neox", "llama")
REWRITE = Rewrite(prompt="the capital of {} is", subject="vel oran", target_new="paris", target_true="rome")
OTHER = Rewrite(prompt="{} is spoken in", subject="tal mira", target_new="berlin", target_true="quenn")
# Small and fast on the 2-layer, 32-wide fixtures; a large lr so a random model's answer moves.
FAST = {"steps": 8, "lr": 2e-2, "n_prefixes": 1, "prefix_length": 3, "stop_loss": None}


def _state(h: ModelHandle) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in h.model.state_dict().items()}


def _p_new(h: ModelHandle, rw: Rewrite = REWRITE) -> float:
    return float(target_probabilities(h, [rw.text], [rw.target_new])[0])


@pytest.fixture(scope="module")
def fitted(tiny_model_dirs: dict[str, Path]) -> dict[str, tuple[ModelHandle, object, object]]:
    """One FT and one FT-L fit per family (fitting is the slow part; several tests read them)."""
    out = {}
    for family in CAUSAL:
        h = load(str(tiny_model_dirs[family]), device="cpu", progress=False)
        out[family] = (h, FineTune(**FAST).fit(h, REWRITE), FineTuneL(**FAST, epsilon=1e-3).fit(h, REWRITE))
    return out


def test_registered() -> None:
    assert get("ft") is FineTune
    assert get("ft-l") is FineTuneL


@pytest.mark.parametrize("family", CAUSAL)
def test_fit_leaves_model_unchanged(load_tiny, family: str) -> None:
    h = load_tiny(family)
    before, state = model_fingerprint(h.model), _state(h)
    delta = FineTuneL(**FAST, epsilon=1e-2).fit(h, REWRITE)
    assert model_fingerprint(h.model) == before
    assert all(torch.equal(state[k], v) for k, v in h.model.state_dict().items())
    assert all(p.grad is None for p in h.model.parameters())  # no gradients left behind
    assert delta.method == "ft-l"


@pytest.mark.parametrize("family", CAUSAL)
def test_delta_is_one_dense_mlp_out_and_reverts_bit_exact(fitted, family: str) -> None:
    h, ft, _ = fitted[family]
    site_map = h.arch.site_map
    layer = h.arch.n_layers // 2
    name = site_map.weight_name(h.model, "mlp_out", layer)
    assert ft.names == [name]
    assert ft.dense(name).shape == dict(h.model.named_parameters())[name].shape
    assert ft.extra["layer"] == layer
    state = _state(h)
    ids = torch.tensor([[5, 6, 7, 8]])
    logits = h.model(input_ids=ids).logits
    with ft.applied(h.model):
        assert not torch.equal(h.model(input_ids=ids).logits, logits)
    assert all(torch.equal(state[k], v) for k, v in h.model.state_dict().items())
    assert torch.equal(h.model(input_ids=ids).logits, logits)


@pytest.mark.parametrize("family", CAUSAL)
def test_ft_raises_target_probability(fitted, family: str) -> None:
    h, ft, _ = fitted[family]
    before = _p_new(h)
    with ft.applied(h.model):
        after = _p_new(h)
    assert after > 1.5 * before, (before, after)
    losses = ft.extra["losses"]
    assert ft.extra["final_loss"] < losses[0]


@pytest.mark.parametrize("family", CAUSAL)
def test_ft_l_change_never_exceeds_epsilon(fitted, family: str) -> None:
    h, ft, ftl = fitted[family]
    (name,) = ftl.names
    change = ftl.dense(name)
    assert float(change.abs().max()) <= 1e-3
    assert float(change.abs().max()) == pytest.approx(1e-3, rel=1e-3)  # the bound is active here
    assert float(ft.dense(name).abs().max()) > 1e-3  # and FT without it goes further
    with ftl.applied(h.model):  # the edited weights lie within [w0 - eps, w0 + eps]
        edited = dict(h.model.named_parameters())[name].detach().clone()
    w0 = dict(h.model.named_parameters())[name].detach()
    assert float((edited - w0).abs().max()) <= 1e-3 + 1e-7
    before = _p_new(h)
    with ftl.applied(h.model):
        assert _p_new(h) > before


def test_same_seed_same_delta(load_tiny) -> None:
    h = load_tiny("gpt2")
    config = FineTune(**{**FAST, "steps": 3})
    a, b = config.fit(h, REWRITE), config.fit(h, REWRITE)
    assert a.extra["prefixes"] == b.extra["prefixes"]
    assert torch.equal(a.dense(a.names[0]), b.dense(b.names[0]))


@pytest.mark.parametrize(("family", "n_params"), [("gpt2", 2), ("llama", 3)])
def test_both_weights_and_explicit_layer(load_tiny, family: str, n_params: int) -> None:
    h = load_tiny(family)
    delta = FineTune(**{**FAST, "steps": 2}, weights="both", layer=0).fit(h, REWRITE)
    site_map = h.arch.site_map
    assert len(delta.names) == n_params  # llama: up, gate and down projections
    assert site_map.weight_name(h.model, "mlp_in", 0) in delta.names
    assert site_map.weight_name(h.model, "mlp_out", 0) in delta.names
    mlp_in = FineTune(**{**FAST, "steps": 2}, weights="mlp_in").fit(h, REWRITE)
    assert mlp_in.names == [site_map.weight_name(h.model, "mlp_in", 1)]


def test_batch_of_rewrites_moves_both(load_tiny) -> None:
    h = load_tiny("gpt_neox")
    before = [_p_new(h, rw) for rw in (REWRITE, OTHER)]
    delta = FineTune(**FAST).fit(h, [REWRITE, OTHER])
    assert isinstance(delta.request, list) and len(delta.request) == 2
    assert delta.extra["n_examples"] == 4  # two rewrites x (prompt + one prefixed copy)
    with delta.applied(h.model):
        after = [_p_new(h, rw) for rw in (REWRITE, OTHER)]
    assert after[0] > before[0] and after[1] > before[1]


def test_batch_size_accumulates_to_the_same_gradient(load_tiny) -> None:
    h = load_tiny("gpt2")
    config = FineTune(**{**FAST, "steps": 2})
    whole = config.fit(h, [REWRITE, OTHER])
    chunked = FineTune(**{**FAST, "steps": 2}, batch_size=1).fit(h, [REWRITE, OTHER])
    name = whole.names[0]
    torch.testing.assert_close(whole.dense(name), chunked.dense(name), atol=1e-6, rtol=1e-4)


def test_delta_saves_with_metadata(fitted, tmp_path: Path) -> None:
    from workbench.delta import WeightDelta

    h, ft, _ = fitted["gpt2"]
    path = ft.save(tmp_path / "ft.delta")
    back = WeightDelta.load(path)
    assert back.method == "ft" and back.request["target_new"] == "paris"
    assert back.extra["config"]["steps"] == FAST["steps"]
    json.dumps(back.metadata())
    assert torch.equal(back.dense(back.names[0]), ft.dense(ft.names[0]))


def test_target_batch_positions_predict_the_target() -> None:
    class Tok:
        pad_token_id, eos_token_id = 0, 0

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [len(w) for w in text.split()]}

    batch = encode_targets(Tok(), ["ab abc a", "a"], ["abcd", "ab abcdef"])
    assert batch.input_ids.tolist() == [[2, 3, 1], [1, 2, 0]]  # prompt + target[:-1], right padded
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.positions.tolist() == [[2, 0], [0, 1]]
    assert batch.targets.tolist() == [[4, 0], [2, 6]]
    assert batch.target_mask.tolist() == [[1, 0], [1, 1]]


def test_bad_requests_are_clear_errors(load_tiny) -> None:
    h = load_tiny("gpt2")
    with pytest.raises(WorkbenchError, match="layers 0..1"):
        FineTune(layer=7).fit(h, REWRITE)
    with pytest.raises(WorkbenchError, match="non-empty list"):
        FineTune().fit(h, [])
    with pytest.raises(WorkbenchError, match="epsilon"):
        FineTuneL(epsilon=0.0)
    with pytest.raises(WorkbenchError, match="weights"):
        FineTune(weights="attn")  # type: ignore[arg-type]
    with pytest.raises(WorkbenchError, match="steps"):
        FineTune(steps=0)
    with pytest.raises(WorkbenchError, match="Rewrite"):
        FineTune().fit(h, ["the capital of vel oran is"])  # type: ignore[list-item]
    bert = load_tiny("bert")
    with pytest.raises(WorkbenchError, match="causal"):
        FineTune().fit(bert, REWRITE)


# ---- FactGPT (slow): the baseline reaches the rewrite, as in the ROME paper's table ------

def _factgpt() -> ModelHandle:
    return factgpt()


@pytest.mark.slow
@pytest.mark.parametrize("cls", [FineTune, FineTuneL])
def test_factgpt_efficacy(cls: type) -> None:
    from workbench.counterfact import evaluate_rewrites

    h = _factgpt()
    world = h.info["world"]
    rewrites = [Rewrite.from_counterfact(r) for r in world.counterfact_records(5, seed=1)]
    before = evaluate_rewrites(h, rewrites, fluency=False, bootstrap=0).aggregate
    wins = []
    for rw in rewrites:
        delta = cls().fit(h, rw)
        with delta.applied(h.model):
            wins.append(evaluate_rewrites(h, [rw], fluency=False, bootstrap=0).aggregate["ES"])
    assert before["ES"] <= 20
    assert sum(wins) / len(wins) >= 80, wins
