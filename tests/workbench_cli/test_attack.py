"""`workbench attack`: config parsing from --set, the cli_run hook, errors, and (slow) real runs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from adversaries.pgd import PGD
from adversaries.registry import register
from workbench.errors import WorkbenchError
from workbench_cli.attack import build_config
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


@register("test-hook-dummy")
@dataclass(frozen=True)
class _HookDummy:
    mode: Literal["a", "b"] = "a"

    def generate(self, handle: Any, inputs: Any, target: Any) -> Any:
        raise AssertionError("the CLI must call cli_run, not generate")

    def cli_run(self, handle: Any, args: Any) -> dict[str, Any]:
        return {"success_consistent": 0.5, "mode": self.mode, "n_attempts": args.n, "options": args.options,
                "kind": handle.kind}


def test_cli_run_hook_dispatch(tiny_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hook"
    rc = main(["attack", "test-hook-dummy", str(tiny_model_dirs["gpt2"]), "--n", "7", "--set", "mode=b",
               "--opt", "placement=grid", "--out", str(out), "--json", "--device", "cpu"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["success_consistent"] == 0.5 and doc["mode"] == "b" and doc["n_attempts"] == 7
    assert doc["options"] == {"placement": "grid"} and doc["kind"] == "causal_lm"
    assert json.loads((out / "metrics.json").read_text())["method"] == "test-hook-dummy"


@pytest.mark.parametrize("argv, message", [
    (["attack", "nope", "zoo:shapesnet"], "unknown adversary"),
    (["attack", "pgd", "zoo:shapesnet", "--set", "eps=x"], "expected a float"),
    (["attack", "pgd", "zoo:shapesnet", "--n", "0"], "positive"),
    (["attack", "scene-search", "zoo:shapesnet", "--source", "star", "--n", "4"], "targeted"),
    (["attack", "scene-search", "zoo:shapesnet", "--target", "cross", "--set", "facets=texture"], "facets"),
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
