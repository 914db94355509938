"""The CLI contract: --json documents on stdout, exit 2 with one line for bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from workbench_cli.main import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "bert"])
def test_sites_json_lists_canonical_and_module_sites(family: str, tiny_model_dirs: dict[str, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "sites", str(tiny_model_dirs[family]), "--json", "--device", "cpu")
    assert code == 0, err
    doc = json.loads(out)
    names = {s["name"] for s in doc["canonical"]}
    assert {"blocks.0.hook_resid_post", "blocks.1.mlp.hook_post", "blocks.1.attn.hook_out"} <= names
    assert doc["family"] == family
    assert len(doc["modules"]) > len(doc["canonical"]) / 2


def test_sites_resolves_one_with_shape(tiny_model_dirs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "sites", str(tiny_model_dirs["gpt2"]), "--site", "blocks.1.mlp.hook_post",
                           "--json", "--device", "cpu")
    assert code == 0
    doc = json.loads(out)
    assert doc["module_path"].startswith("transformer.h.1.mlp")
    assert doc["shape"][-1] == 4 * 32  # GPT-2's MLP is 4 x d_model wide


def test_unknown_site_exits_2_with_valid_names(tiny_model_dirs: dict[str, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "sites", str(tiny_model_dirs["gpt2"]), "--site", "blocks.9.mlp.hook_post",
                             "--device", "cpu")
    assert code == 2
    assert out == ""
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and err.rstrip("\n").endswith(error_lines[0])
    assert "L = 0..1" in err and "blocks.1.mlp.hook_post" in err  # the valid range and a suggestion


@pytest.mark.parametrize("argv, fragment", [
    (["sites", "zoo:nonexistent"], "zoo has: factgpt, factgpt-large, shapesnet"),
    (["sites", "/no/such/folder/anywhere"], "valid specs"),
    (["zoo", "info", "resnet"], "zoo has"),
    (["world", "export", "factworld", "--n", "0", "--out", "x.json"], "positive"),
    (["world", "export", "shapesworld", "--n", "3", "--out", "x.json"], "world render"),
    (["world", "export", "factworld", "--n", "301", "--distinct-subjects", "--out", "x.json"], "300 subjects"),
    (["world", "export", "factworld", "--n", "3", "--model", "zoo:shapesnet", "--out", "x.json"], "FactGPT zoo model"),
])
def test_bad_input_exits_2_with_one_line(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert fragment in err
    assert "Traceback" not in err and err.strip().count("\n") == 0
    assert not (tmp_path / "x.json").exists()  # no partial output


def test_usage_error_is_one_line_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "workbench_cli.main", "zoo", "dance"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "invalid choice" in proc.stderr


def test_world_export_factworld_writes_counterfact_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "records.json"
    code, stdout, _ = run_cli(capsys, "world", "export", "factworld", "--n", "12", "--out", str(out), "--json")
    assert code == 0
    assert json.loads(stdout)["n"] == 12
    records = json.loads(out.read_text())
    assert len(records) == 12
    for rec in records:
        rw = rec["requested_rewrite"]
        assert "{}" in rw["prompt"] and rw["subject"]
        assert rw["target_new"]["str"] != rw["target_true"]["str"]
        assert rec["paraphrase_prompts"] and rec["neighborhood_prompts"] and rec["generation_prompts"]


def test_world_export_distinct_subjects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "records.json"
    code, stdout, _ = run_cli(capsys, "world", "export", "factworld", "--n", "300", "--distinct-subjects",
                              "--out", str(out), "--json")
    assert code == 0 and json.loads(stdout)["distinct_subjects"] is True
    subjects = [r["requested_rewrite"]["subject"] for r in json.loads(out.read_text())]
    assert len(subjects) == len(set(subjects)) == 300


def test_world_render_shapesworld_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "grid.png"
    code, _, _ = run_cli(capsys, "world", "render", "shapesworld", "--n", "3", "--out", str(out))
    assert code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zoo_list_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "zoo", "list", "--json", "--cache", str(tmp_path))
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["factgpt", "factgpt-large", "shapesnet", "gpt2-medium-arch",
                                         "gpt2-small-arch", "llama-arch", "pythia-160m-arch"]
    assert not any(r["cached"] for r in rows)  # an empty cache trains nothing by listing


def test_json_output_is_strict_json_with_a_note_where_a_value_is_not_finite(
        tiny_model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    code, out, err = run_cli(capsys, "ablate", str(tiny_model_dirs["gpt2"]), "--site", "blocks.0.mlp.hook_post",
                             "--units", "1,2", "--factor", "1e38", "--out", str(tmp_path / "d.delta"),
                             "--device", "cpu", "--json")
    assert code == 0, err
    doc = json.loads(out, parse_constant=refuse)
    assert doc["lm_loss_after"] is None and "not a finite number" in doc["lm_loss_after_note"]
    assert math.isfinite(doc["lm_loss_before"])
