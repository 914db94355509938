"""Suites of models: the dev and held-out definitions, their hashes, a user's models, the checks
every model passes before a study runs, and what a run records about models and code."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from workbench.errors import WorkbenchError
from workbench.handle import ModelHandle
from workbench.suite import (
    DEV_SPECS,
    FACTGPT_ARCHS,
    FACTGPT_DEPTHS,
    SHAPESNET_WIDTHS,
    TRAININGS,
    Suite,
    SuiteModel,
    check_model,
    code_version,
    dev_suite,
    heldout_suite,
    make_suite,
    model_record,
    zoo_checks,
)


def test_dev_suite_is_the_zoo_models_the_defaults_were_chosen_on() -> None:
    suite = dev_suite(quick=True)
    assert {r: list(s) for r, s in suite.roles.items()} == {r: [s] for r, s in DEV_SPECS.items()}
    assert all(m.dev and not m.given for r in suite.roles for m in suite.models(r))
    assert dev_suite().roles == suite.roles  # quick or not, the same models


def test_quick_heldout_suite_covers_three_architectures_one_shapesnet() -> None:
    suite = heldout_suite(7, quick=True)
    fact = suite.roles["factgpt"]
    assert len(fact) == 3 and all(s.endswith("@7") for s in fact)
    assert {s.split("-")[1] for s in fact} == set(FACTGPT_ARCHS)
    assert len({s.split("-")[2].split("@")[0] for s in fact}) == 1  # one depth
    assert sum("-plain@" in s for s in fact) == 1  # with and without subject enrichment among them
    assert len(suite.roles["shapesnet"]) == 1 and suite.roles["shapesnet"][0].startswith("zoo:shapesnet-w")
    assert suite.roles["minilm"] == ("minilm",)
    assert not any(m.dev for m in suite.models("factgpt") + suite.models("shapesnet"))


def test_full_heldout_suite_trains_every_variant_three_times() -> None:
    suite = heldout_suite(7, quick=False)
    fact = suite.roles["factgpt"]
    n_variants = len(FACTGPT_ARCHS) * len(FACTGPT_DEPTHS) * 2
    assert len(fact) == n_variants * TRAININGS == len(set(fact))
    variants = {s.split("@")[0] for s in fact}
    assert len(variants) == n_variants
    for v in variants:
        assert sorted(int(s.split("@")[1]) for s in fact if s.split("@")[0] == v) == [7, 8, 9]
    assert {f"{d}l" for d in FACTGPT_DEPTHS} == {s.split("-")[2].split("@")[0] for s in fact}
    assert len(suite.roles["shapesnet"]) == len(SHAPESNET_WIDTHS) * TRAININGS
    assert "training and world variance" in suite.variance()


def test_every_heldout_spec_is_a_zoo_name() -> None:
    from workbench import zoo

    for quick in (True, False):
        suite = heldout_suite(3, quick=quick)
        for role in ("factgpt", "shapesnet"):
            for spec in suite.roles[role]:
                name, seed = zoo.parse_spec(spec.removeprefix("zoo:"))
                assert seed is not None and seed >= 3, spec


def test_hash_covers_every_option() -> None:
    base = heldout_suite(7, quick=True)
    assert base.sha256 == heldout_suite(7, quick=True).sha256 == base.to_json()["sha256"]
    others = [heldout_suite(8, quick=True), heldout_suite(7, quick=False), dev_suite(quick=True),
              base.with_models({"factgpt": ["zoo:factgpt@3"]})]
    assert len({base.sha256, *(o.sha256 for o in others)}) == 1 + len(others)
    record = base.to_json()
    assert record["seed"] == 7 and record["quick"] is True and record["name"] == "heldout"
    assert [m["spec"] for m in record["models"]] == [s for specs in base.roles.values() for s in specs]


def test_user_models_replace_a_role_and_are_not_dev() -> None:
    suite = dev_suite().with_models({"factgpt": ["/models/a", "/models/b", "/models/a"]})
    assert suite.roles["factgpt"] == ("/models/a", "/models/b")
    assert [m.given for m in suite.models("factgpt")] == [True, True]
    assert not any(m.dev for m in suite.models("factgpt"))
    assert suite.roles["shapesnet"] == ("zoo:shapesnet",) and not suite.models("shapesnet")[0].given
    assert suite.to_json()["given"] == {"factgpt": ["/models/a", "/models/b"]}


@pytest.mark.parametrize("call, fragment", [
    (lambda: make_suite("nope"), "suites: dev, heldout"),
    (lambda: make_suite("heldout"), "needs --suite-seed"),
    (lambda: make_suite("heldout", seed=-1), "expected an integer 1.."),
    (lambda: make_suite("heldout", seed=0), "seed 0 drew the development models"),
    (lambda: make_suite("heldout", seed=2**31 - 1), "the full suite trains seeds"),
    (lambda: make_suite("dev", seed=3), "applies to --suite heldout"),
    (lambda: make_suite("dev", models={"llm": ["gpt2"]}), "its roles: factgpt"),
    (lambda: make_suite("dev", models={"factgpt": [""]}), "give a model spec"),
    (lambda: dev_suite().models("llm"), "no role 'llm'"),
    (lambda: Suite("x", {"toy": ("a", "a")}), "distinct model specs"),
])
def test_bad_suite_input_is_one_clear_error(call: Callable[[], Any], fragment: str) -> None:
    with pytest.raises(WorkbenchError, match=fragment) as info:
        call()
    assert "\n" not in str(info.value)


# --- checks before any study runs -----------------------------------------------------------

def test_an_image_model_does_not_fit_a_knowledge_role(cnn_handle: ModelHandle) -> None:
    with pytest.raises(WorkbenchError, match="it is a image classifier; factgpt needs a causal LM with a tokenizer "
                                             "whose folder holds a FactWorld"):
        check_model(SuiteModel("factgpt", "test:small-cnn", dev=False, given=True), cnn_handle)


@pytest.mark.parametrize("family, role, fragment", [
    ("gpt2", "factgpt", "holds no FactWorld"),
    ("gpt2", "shapesnet", "it is a causal LM; shapesnet needs an image classifier"),
    ("bert", "factgpt", "it is a masked LM"),
    ("gpt2", "minilm", "it is a causal LM; minilm needs a transformer text encoder"),
])
def test_role_fit_says_what_fits(load_tiny: Callable[[str], ModelHandle], family: str, role: str,
                                 fragment: str) -> None:
    with pytest.raises(WorkbenchError, match=fragment):
        check_model(SuiteModel(role, f"tiny-{family}", dev=False), load_tiny(family))


def test_the_dev_zoo_records_pass_and_a_weak_model_names_its_check() -> None:
    good = SimpleNamespace(info={"name": "factgpt", "accuracy": 0.997, "prefixed_accuracy": 0.996})
    assert [c["passed"] for c in zoo_checks(good)] == [True, True]
    shapes = SimpleNamespace(info={"name": "shapesnet", "accuracy": 0.985, "trojans": [
        {"name": "patch-universal", "attack_success": 0.98}, {"name": "style-star", "attack_success": 0.31}]})
    failed = [c["name"] for c in zoo_checks(shapes) if not c["passed"]]
    assert failed == ["attack success of trojan style-star"]
    with pytest.raises(WorkbenchError, match=r"model m \(toy\) fails the zoo's check 'attack success of trojan "
                                             r"style-star': 0.3100 \(needs >= 0.8\)"):
        check_model(SuiteModel("toy", "m", dev=False), shapes)
    recorded = SimpleNamespace(info={"name": "factgpt-neox-4l", "checks": [
        {"check": "fact accuracy", "value": 0.95, "bound": 0.99, "at_least": True, "passed": False}]})
    assert [(c["name"], c["passed"]) for c in zoo_checks(recorded)] == [("fact accuracy", False)]
    assert zoo_checks(SimpleNamespace(info={})) == []  # a model without a zoo record has no zoo checks


def test_check_model_refuses_a_model_that_fails_a_zoo_check() -> None:
    weak = SimpleNamespace(info={"name": "factgpt", "accuracy": 0.93, "prefixed_accuracy": 0.99})
    with pytest.raises(WorkbenchError, match=r"model m \(toy\) fails the zoo's check 'fact accuracy': 0.9300"):
        check_model(SuiteModel("toy", "m", dev=False), weak)


# --- what a run records ---------------------------------------------------------------------

def test_model_record_reads_the_handle_and_the_variant_name() -> None:
    handle = SimpleNamespace(arch=SimpleNamespace(family="gpt_neox", n_layers=4, d_model=128),
                             info={"name": "factgpt-neox-4l-plain", "seed": 5, "version": 1, "subject_bottleneck": 0.0,
                                   "world_seed": 5}, model=None)
    rec = model_record(SuiteModel("factgpt", "zoo:factgpt-neox-4l-plain@5", dev=False), handle)
    assert rec["architecture"] == "gpt_neox" and rec["layers"] == 4 and rec["seed"] == 5
    assert rec["enrichment"] is False and rec["world_seed"] == 5 and rec["dev"] is False
    bare = model_record(SuiteModel("shapesnet", "zoo:shapesnet-w24@5", dev=False), None)
    assert bare["width"] == 24 and bare["architecture"] is None


def test_code_version_is_the_commit_here_and_never_fails_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    here = code_version()
    assert here["package"] and (here["git"] is None or len(here["git"]) == 40)

    def no_git(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert code_version() == {"git": None, "dirty": None, "package": here["package"]}
