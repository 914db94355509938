"""`workbench attack`: config parsing from --set (nested groups too), the protocols, errors, and (slow) real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adversaries.pgd import PGD
from workbench.errors import WorkbenchError
from workbench_cli.attack import PROTOCOLS, build_config
from workbench_cli.main import main


def test_build_config_parses_field_types() -> None:
    cfg = build_config(PGD, ["eps=8/255", "steps=3", "norm=l2", "random_start=false", "loss=margin"])
    assert cfg == PGD(eps=8 / 255, steps=3, norm="l2", random_start=False, loss="margin")
    from adversaries.adversarial_patch import AdversarialPatch
    from adversaries.feature_level import FeatureLevel

    assert build_config(AdversarialPatch, ["scale_range=0.5,1.5", "patch_pixels=none"]).scale_range == (0.5, 1.5)
    assert build_config(FeatureLevel, ["shapes=ring,star"]).shapes == ("ring", "star")


@pytest.mark.parametrize("setting, match", [("eps=abc", "expected a float"), ("norm=l3", "expected one of"),
                                            ("nope=1", "has no field"), ("eps", "FIELD=VALUE"),
                                            ("random_start=maybe", "true or false")])
def test_build_config_errors(setting: str, match: str) -> None:
    with pytest.raises(WorkbenchError, match=match):
        build_config(PGD, [setting])


def test_build_config_sets_nested_groups_by_dotted_names() -> None:
    from adversaries.copy_paste import CopyPaste, DesignConfig
    from adversaries.placement_sweep import SweepConfig

    cfg = build_config(CopyPaste, ["design.featvis_steps=64", "design.kind=featvis", "design.n_units=none",
                                   "sweep.sizes=0.2,0.3", "sweep.grid=4", "seed=3"])
    assert cfg == CopyPaste(design=DesignConfig(featvis_steps=64, kind="featvis", n_units=None),
                            sweep=SweepConfig(sizes=(0.2, 0.3), grid=4), seed=3)
    assert build_config(CopyPaste, []) == CopyPaste()


@pytest.mark.parametrize("setting, match", [
    ("featvis_steps=3", "no field 'featvis_steps' \\(did you mean design.featvis_steps\\?\\); fields: design.site"),
    ("design=auto", "'design' is a group of fields; set them one by one"),
    ("design.nope=1", "has no field 'design.nope'"),
    ("sweep.grid=x", "sweep.grid=x: expected a int"),
    ("design.kind=both", "design.kind=both: expected one of auto"),
])
def test_build_config_nested_errors(setting: str, match: str) -> None:
    from adversaries.copy_paste import CopyPaste

    with pytest.raises(WorkbenchError, match=match):
        build_config(CopyPaste, [setting])


def test_protocols_run_copy_paste_and_text_trigger() -> None:
    assert set(PROTOCOLS) == {"copy-paste", "text-trigger"}


@pytest.mark.parametrize("argv, message", [
    (["attack", "nope", "zoo:shapesnet"], "unknown adversary"),
    (["attack", "pgd", "zoo:shapesnet", "--set", "eps=x"], "expected a float"),
    (["attack", "pgd", "zoo:shapesnet", "--n", "0"], "positive"),
    (["attack", "scene-search", "zoo:shapesnet", "--source", "star", "--n", "4"], "targeted"),
    (["attack", "scene-search", "zoo:shapesnet", "--target", "cross", "--set", "facets=texture"], "facets"),
    (["attack", "copy-paste", "zoo:shapesnet"], "needs --target"),
    (["attack", "copy-paste", "zoo:shapesnet", "--target", "star", "--set", "grid=3"], "did you mean sweep.grid?"),
])
def test_cli_user_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_text_model_needs_inputs(tiny_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["attack", "pgd", str(tiny_model_dirs["gpt2"]), "--out", str(tmp_path / "x"), "--device", "cpu"])
    assert rc == 2 and "--inputs" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [
    ("pgd", ["--source", "square", "--target", "star"]),
    ("feature-level", ["--source", "circle", "--target", "hexagon", "--set", "steps=20", "--set", "restarts=1"]),
    ("adversarial-filtering", ["--set", "n_scenes=300"]),
    ("scene-search", ["--source", "star", "--target", "cross", "--set", "n_random=8", "--set", "n_starts=1"]),
])
def test_cli_attack_shapesnet_writes_examples_grid_metrics(method: str, extra: list[str], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / method
    rc = main(["attack", method, "zoo:shapesnet", "--n", "8", "--out", str(out), "--json", "--device", "cpu", *extra])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["method"] == method
    for name in ("examples.safetensors", "examples.json", "metrics.json"):
        assert (out / name).is_file()
    if doc["n"]:
        assert (out / "grid.png").is_file()


@pytest.mark.slow
def test_cli_text_trigger_factgpt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["attack", "text-trigger", "zoo:factgpt", "--n", "6", "--set", "steps=5", "--out", str(tmp_path / "tt"),
               "--json", "--device", "cpu"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"trigger", "control_success", "success_heldout", "relation"} <= set(doc)


@pytest.mark.slow
def test_cli_copy_paste_shapesnet_writes_examples_grid_patch_metrics(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cp"
    rc = main(["attack", "copy-paste", "zoo:shapesnet", "--target", "hexagon", "--n", "40", "--out", str(out), "--json",
               "--device", "cpu", "--set", "design.n_featvis=2", "--set", "design.n_featvis_context=0",
               "--set", "design.featvis_steps=24", "--set", "design.n_exemplars=1", "--set", "design.n_pool=128",
               "--set", "sweep.grid=2", "--set", "sweep.sizes=0.27,0.33"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["method"] == "copy-paste" and doc["target"] == "hexagon" and doc["n_placements"] == 2 * 2 * 2
    for key in ("success_consistent", "success_best", "control_noise", "control_natural", "n_attempts"):
        assert key in doc
    for name in ("examples.safetensors", "examples.json", "metrics.json", "grid.png", "patch.png"):
        assert (out / name).is_file()

