"""DAS and its baselines on a toy whose variable lives in known coordinates behind a random rotation.

The toy's hidden layer is h = Q z, with the variable `a` coded in z[0:2], a second variable `b`
in z[2:4] and noise in z[4:8]; the output is (a + b) mod 4, read back through Q^T. Swapping a's
subspace from a source must give (a_source + b_base) mod 4: DAS must find span(Q[:, 0:2]),
while a random plane must not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from workbench.causal_variables import DASConfig, InterchangePairs, InterchangeRunner, align
from workbench.causal_variables.das import diff_means_basis, leace_basis, probe_basis, random_basis
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle

WIDTH, VALUES = 8, 4


class PlantedToy(nn.Module):
    """Inputs z (N, 8); site `hidden` = Q z; output log p((a + b) mod 4) decoded from Q^T h."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=g, dtype=torch.float64))
        self.hidden = nn.Linear(WIDTH, WIDTH, bias=False)
        with torch.no_grad():
            self.hidden.weight.copy_(q.float())
        self.register_buffer("q", q.float())
        angles = 2 * math.pi * torch.arange(VALUES) / VALUES
        self.register_buffer("codes", 3 * torch.stack([angles.cos(), angles.sin()], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.hidden(x) @ self.q
        pa = (2 * z[:, 0:2] @ self.codes.T).softmax(-1)
        pb = (2 * z[:, 2:4] @ self.codes.T).softmax(-1)
        idx = (torch.arange(VALUES)[:, None] - torch.arange(VALUES)[None, :]) % VALUES
        shift = pb[:, idx]  # shift[:, c, a] = pb[:, (c - a) % 4]
        return torch.log((shift * pa[:, None, :]).sum(-1) + 1e-9)


def toy_pairs(n: int = 600, seed: int = 0) -> InterchangePairs:
    g = torch.Generator().manual_seed(seed)
    toy = PlantedToy()
    a_b, b_b = torch.randint(VALUES, (n,), generator=g), torch.randint(VALUES, (n,), generator=g)
    a_s = (a_b + torch.randint(1, VALUES, (n,), generator=g)) % VALUES  # every pair changes a, so the answer
    b_s = torch.randint(VALUES, (n,), generator=g)

    def inputs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([toy.codes[a], toy.codes[b], 0.5 * torch.randn(n, 4, generator=g)], 1)

    return InterchangePairs(variable="a", kind="tensors", base=inputs(a_b, b_b), source=inputs(a_s, b_s),
                            base_labels=(a_b + b_b) % VALUES, counterfactual_labels=(a_s + b_b) % VALUES,
                            base_values=a_b, source_values=a_s, groups=torch.arange(n),
                            value_names=tuple(str(i) for i in range(VALUES)))


def test_toy_answers_its_own_rule() -> None:
    pairs = toy_pairs(200)
    pred = PlantedToy()(pairs.base).argmax(-1)
    assert torch.equal(pred, pairs.base_labels)


def test_das_recovers_the_planted_variable_and_random_does_not() -> None:
    pairs = toy_pairs()
    result = align(PlantedToy(), pairs, "hidden", DASConfig(dim=2, steps=150, batch_size=64, lr=0.05,
                                                            methods=("das", "random", "full")), progress=False)
    das, rand, full = (result.method(m) for m in ("das", "random", "full"))
    assert das.iia >= 0.95 and das.k == 2
    assert rand.iia <= 0.5 and das.iia - rand.iia >= 0.45
    assert full.iia <= 0.5  # the whole vector carries b too: swapping it gives the source's answer instead
    assert result.baseline_iia == 0.0
    lo, hi = das.ci
    assert lo is not None and hi is not None and lo <= das.iia <= hi
    # the learned plane is the planted one: projecting Q's first two columns onto it keeps them whole
    planted = PlantedToy().q[:, :2]
    assert float((das.basis.T @ planted).norm() ** 2) >= 1.6  # 2 when the planes coincide
    assert float((rand.basis.T @ planted).norm() ** 2) < 1.0  # 0.5 expected for a random plane


@pytest.mark.parametrize("fit", [diff_means_basis, leace_basis, probe_basis])
def test_supervised_directions_span_the_planted_plane(fit: Callable[..., torch.Tensor]) -> None:
    pairs = toy_pairs(400)
    toy = PlantedToy()
    x = toy.hidden(pairs.base).detach()
    basis = fit(x, pairs.base_values, 2)
    planted = toy.q[:, :2]
    overlap = float((basis.T @ planted).norm() ** 2)  # 2 when the planes coincide, ~0.5 for a random plane
    assert basis.shape == (WIDTH, 2) and torch.allclose(basis.T @ basis, torch.eye(2), atol=1e-5)
    assert overlap >= 1.9
    assert float((random_basis(WIDTH, 2, seed=0).T @ planted).norm() ** 2) < 1.5


def test_identity_intervention_leaves_outputs_unchanged_toy() -> None:
    pairs = toy_pairs(64)
    same = InterchangePairs(**{**pairs.__dict__, "source": pairs.base})
    runner = InterchangeRunner(PlantedToy(), "hidden", same)
    rows = torch.arange(len(same))
    source = runner.read("source")
    with torch.no_grad():
        plain = runner.logits(rows, None, None)
        swapped = runner.logits(rows, torch.eye(WIDTH), source)
        planted = runner.logits(rows, random_basis(WIDTH, 3, seed=1), source)
    assert torch.equal(plain, swapped) and torch.equal(plain, planted)


def test_identity_intervention_on_a_language_model_at_a_token(load_tiny: Callable[[str], ModelHandle]) -> None:
    handle = load_tiny("gpt2")
    seqs = [[5, 9, 12, 7], [8, 11, 6], [10, 20, 30, 40, 50]]
    n = len(seqs)
    pairs = InterchangePairs(variable="x", kind="tokens", base=seqs, source=seqs, base_positions=torch.tensor([1, 2, 3]),
                             source_positions=torch.tensor([1, 2, 3]), base_labels=torch.zeros(n, dtype=torch.long),
                             counterfactual_labels=torch.ones(n, dtype=torch.long), base_values=torch.arange(n),
                             source_values=torch.arange(n), groups=torch.arange(n), value_names=("a", "b", "c"))
    runner = InterchangeRunner(handle, "blocks.0.hook_resid_post", pairs)
    rows = torch.arange(n)
    source = runner.read("source")
    with torch.no_grad():
        plain = runner.logits(rows, None, None)
        swapped = runner.logits(rows, random_basis(runner.width, 4, seed=0), source)
        # a real swap (another source) moves the outputs: the hook does act
        moved = runner.logits(rows, torch.eye(runner.width), source.roll(1, 0))
    assert runner.width == 32
    assert torch.equal(plain, swapped)
    assert not torch.allclose(plain, moved)


def test_identity_intervention_on_a_conv_map(cnn_handle: ModelHandle) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 16, 16, generator=g)
    n = len(images)
    pairs = InterchangePairs(variable="x", kind="tensors", base=images, source=images,
                             base_labels=torch.zeros(n, dtype=torch.long), counterfactual_labels=torch.ones(n, dtype=torch.long),
                             base_values=torch.arange(n) % 2, source_values=torch.arange(n) % 2, groups=torch.arange(n),
                             value_names=("a", "b"))
    site = [name for name, m in cnn_handle.model.named_modules() if isinstance(m, nn.Conv2d)][-1]
    runner = InterchangeRunner(cnn_handle, site, pairs)
    rows = torch.arange(n)
    with torch.no_grad():
        plain = runner.logits(rows, None, None)
        swapped = runner.logits(rows, torch.eye(runner.width), runner.read("source"))
    assert torch.allclose(plain, swapped, atol=1e-6)


def test_same_seed_same_numbers_other_seed_other_plane() -> None:
    pairs = toy_pairs(300)
    cfg = DASConfig(dim=2, steps=30, batch_size=32, lr=0.05, methods=("das", "probe", "random"))

    def run(config: DASConfig) -> list[dict]:
        doc = align(PlantedToy(), pairs, "hidden", config, progress=False).to_json()
        return [{k: v for k, v in m.items() if k != "seconds"} for m in doc["methods"]] + [doc["das_loss"]]

    assert run(cfg) == run(cfg)
    assert run(cfg) != run(DASConfig(**{**cfg.__dict__, "seed": 1}))


def test_bad_settings_are_refused() -> None:
    pairs = toy_pairs(50)
    with pytest.raises(WorkbenchError, match="larger than site hidden's width 8"):
        align(PlantedToy(), pairs, "hidden", DASConfig(dim=9, methods=("random",)), progress=False)
    with pytest.raises(WorkbenchError, match="at least one dimension"):
        DASConfig(dim=0)
    with pytest.raises(WorkbenchError, match="choose from"):
        DASConfig(methods=("pca",))
    with pytest.raises(WorkbenchError, match="unknown site|not a site|valid"):
        InterchangeRunner(PlantedToy(), "nowhere", pairs)


def test_plot_and_json_round_trip(tmp_path: Path) -> None:
    import json

    from workbench.causal_variables import plot_iia

    result = align(PlantedToy(), toy_pairs(200), "hidden", DASConfig(dim=2, steps=10, methods=("das", "random")),
                   progress=False)
    doc = json.loads(json.dumps(result.to_json()))
    assert [m["method"] for m in doc["methods"]] == ["das", "random"]
    path = plot_iia(doc, tmp_path / "iia.png")
    assert Path(path).read_bytes()[:4] == b"\x89PNG"


def test_sae_baseline_picks_the_latents_that_carry_the_variable() -> None:
    from workbench.causal_variables.das import sae_basis

    pairs = toy_pairs(400)
    toy = PlantedToy()
    h = toy.hidden(pairs.base).detach()
    # a "dictionary" whose first latents read the noise, and whose last two read a's plane
    decoder = torch.cat([toy.q[:, 4:8].T, toy.q[:, 0:2].T])  # (6 latents, width)
    latents = torch.relu(h @ decoder.T)
    basis, chosen = sae_basis(latents, pairs.base_values, decoder, 2)
    assert sorted(chosen) == [4, 5]
    assert float((basis.T @ toy.q[:, :2]).norm() ** 2) > 1.99


@pytest.mark.slow
def test_factgpt_pairs_mean_what_they_say() -> None:
    from tests import zoo_models
    from workbench.causal_variables import fact_pairs
    from workbench.zoo.factgpt import object_token_ids

    handle = zoo_models.factgpt()
    world = handle.world
    ids = object_token_ids(handle.tokenizer, world)
    for variable in ("subject", "relation"):
        pairs = fact_pairs(handle, variable, n=40, seed=3)
        assert len(pairs) == 40 and (pairs.counterfactual_labels != pairs.base_labels).all()
        subjects, rels = world.subjects, [r.relation_id for r in world.relations]
        for i in range(len(pairs)):
            if variable == "subject":
                # the source's subject under the base's relation: find the base's relation from its label
                s_src = subjects[int(pairs.source_values[i])]
                s_base = subjects[int(pairs.base_values[i])]
                rel = next(r for r in rels if ids[world.object_of(s_base, r)] == int(pairs.base_labels[i]))
                assert int(pairs.counterfactual_labels[i]) == ids[world.object_of(s_src, rel)]
            else:
                rel_src = rels[int(pairs.source_values[i])]
                assert rel_src != rels[int(pairs.base_values[i])]
        tok = handle.tokenizer
        # positions: the subject's last token, or the last token
        for seq, pos in zip(pairs.base[:5], pairs.base_positions[:5].tolist()):
            text = tok.decode(seq[: pos + 1])
            if variable == "subject":
                assert any(text.endswith(s) for s in subjects), text
            else:
                assert pos == len(seq) - 1


@pytest.mark.slow
def test_shapesnet_pairs_change_the_answer_through_the_variable() -> None:
    from workbench.causal_variables import scene_pairs
    from workbench.models import load

    handle = load("zoo:shapesnet", device="cpu", progress=False)
    shape = scene_pairs(handle, "shape", n=60, seed=1)
    assert (shape.counterfactual_labels != shape.base_labels).all() and (shape.base_values != shape.source_values).all()
    # the model's answer on the re-shaped scene is, almost always, the source's shape: the world's label
    assert shape.meta["counterfactual_is_world_label"] >= 0.9
    assert torch.equal(shape.base_labels, shape.base_values)
    colour = scene_pairs(handle, "colour", n=60, seed=1)
    red = list(colour.value_names).index("red")
    # colour moves ShapesNet's answer mostly through its spurious red-square shortcut: red is on one side of most
    # pairs that change the answer (of random pairs, 19% involve red)
    assert ((colour.base_values == red) | (colour.source_values == red)).float().mean() >= 0.7


def test_split_keeps_groups_on_one_side_and_is_seeded() -> None:
    pairs = toy_pairs(100)
    pairs = InterchangePairs(**{**pairs.__dict__, "groups": torch.arange(100) // 4})  # 25 bases, 4 pairs each
    train, test = pairs.split_rows(0.3, seed=0)
    assert len(train) + len(test) == 100 and len(test) == 32  # 8 of 25 groups, whole
    assert not set(pairs.groups[train].tolist()) & set(pairs.groups[test].tolist())
    assert torch.equal(pairs.split_rows(0.3, seed=0)[1], test)
    assert not torch.equal(pairs.split_rows(0.3, seed=1)[1], test)
    with pytest.raises(WorkbenchError, match="held-out share"):
        pairs.split_rows(1.0, seed=0)
