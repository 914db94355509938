"""Tasks: FactGPT pairs differ only in the subject, trojan pairs only in the trigger, and every input a
model cannot use is refused with one line saying what would work."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests import zoo_models
from tests.workbench.circuits.conftest import PAIRS
from workbench.circuits import task_for
from workbench.circuits.tasks import logits_of, pairs_task
from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle


@pytest.fixture(scope="module")
def factgpt() -> ModelHandle:
    return zoo_models.factgpt()


@pytest.fixture(scope="module")
def shapesnet() -> ModelHandle:
    from workbench.models import load

    return load("zoo:shapesnet", device="cpu", progress=False)


def test_fact_pairs_swap_the_subject_and_the_model_knows_both(factgpt: ModelHandle) -> None:
    task = task_for(factgpt, "facts", n=12, seed=4)
    clean, corrupt = task.clean["input_ids"], task.corrupted["input_ids"]
    assert clean.shape == corrupt.shape and task.n == 12
    differs = (clean != corrupt).sum(1)
    assert bool(((differs >= 1) & (differs <= 2)).all())  # the subject's tokens only
    with torch.no_grad():
        lc = logits_of(factgpt.model(**task.clean))
        lx = logits_of(factgpt.model(**task.corrupted))
    assert float(task.metric(lc)) > 0 > float(task.metric(lx))  # true object wins on clean, the other on corrupted
    assert task_for(factgpt, "facts", n=12, seed=4).clean["input_ids"].equal(clean)


def test_trojan_pairs_differ_by_the_trigger(shapesnet: ModelHandle) -> None:
    task = task_for(shapesnet, "trojan:patch-square", n=8, seed=1)
    assert task.info["source"] == "square" and task.clean.shape == task.corrupted.shape
    changed = (task.clean - task.corrupted).abs().amax(1) > 1e-6
    assert 0 < float(changed.float().mean()) < 0.5  # a small patch, the rest of the scene as it was
    with torch.no_grad():
        assert float(task.metric(shapesnet.model(task.clean))) > float(task.metric(shapesnet.model(task.corrupted)))


def test_tasks_a_model_cannot_do(factgpt: ModelHandle, shapesnet: ModelHandle) -> None:
    with pytest.raises(WorkbenchError, match="trojan tasks need an image classifier"):
        task_for(factgpt, "trojan:patch-universal")
    with pytest.raises(WorkbenchError, match="facts task needs a language model"):
        task_for(shapesnet, "facts")
    with pytest.raises(WorkbenchError, match="unknown trojan 'nope'; this model's trojans: patch-universal"):
        task_for(shapesnet, "trojan:nope")
    with pytest.raises(WorkbenchError, match="unknown task 'fact'"):
        task_for(factgpt, "fact")


def test_pairs_files(load_tiny: Callable[[str], ModelHandle], tmp_path: Path) -> None:
    h = load_tiny("gpt2")
    file = tmp_path / "pairs.json"
    file.write_text(json.dumps({"pairs": PAIRS}))
    task = task_for(h, str(file))
    assert task.n == len(PAIRS) and task.name == "pairs.json"
    cases = [
        ([], "holds no counterfactual pairs"),
        ([{**PAIRS[0], "corrupted": "the capital of the rome is"}], "clean prompt is 5 tokens and the corrupted one 6"),
        ([{**PAIRS[0], "answer": "quenn paris"}], "answer 'quenn paris' is 2 tokens"),
        ([{"clean": "the cat"}], "expected an object with string fields"),
        ({"items": []}, "expected a JSON list of pairs"),
    ]
    for content, fragment in cases:
        file.write_text(json.dumps(content))
        with pytest.raises(WorkbenchError, match=fragment):
            task_for(h, str(file))
    file.write_text("[{")
    with pytest.raises(WorkbenchError, match="not valid JSON"):
        task_for(h, str(file))
    with pytest.raises(WorkbenchError, match="does not exist"):
        task_for(h, str(tmp_path / "absent.json"))
    with pytest.raises(WorkbenchError, match="prompt pairs need a causal language model"):
        pairs_task(load_tiny("bert"), PAIRS, name="p")
