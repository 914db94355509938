"""`workbench circuit`: a circuit on a tiny GPT-2 from a pairs file (JSON out, circuit.json and a PNG),
and bad input exits 2 with one line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.workbench.circuits.conftest import PAIRS
from workbench.circuits import Circuit
from workbench_cli.main import main


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def pairs_file(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(PAIRS))
    return path


@pytest.mark.parametrize("method, level", [("eap-ig", "edge"), ("acdc", "node")])
def test_circuit_from_a_pairs_file(tiny_model_dirs: dict[str, Path], pairs_file: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], method: str, level: str) -> None:
    out = tmp_path / "circ"
    code, stdout, err = _run(capsys, ["circuit", str(tiny_model_dirs["gpt2"]), "--task", str(pairs_file), "--method",
                                      method, "--level", level, "--random-draws", "2", "--steps", "3", "--out", str(out),
                                      "--device", "cpu", "--json"])
    assert code == 0, err
    r = json.loads(stdout)
    for key in ("method", "nodes", "edges", "cpr", "cmd", "random_cpr", "seconds"):
        assert key in r, key
    assert r["method"] == method and r["level"] == level and r["seconds"] > 0
    assert (r["edges"] == []) == (level == "node")
    circuit = Circuit.load(out / "circuit.json")
    assert circuit.nodes == r["nodes"] and circuit.results["cpr"] == r["cpr"]
    assert (out / "circuit.png").read_bytes()[:4] == b"\x89PNG"


def test_text_output_without_out(tiny_model_dirs: dict[str, Path], pairs_file: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, err = _run(capsys, ["circuit", str(tiny_model_dirs["llama"]), "--task", str(pairs_file), "--method",
                                      "eap", "--random-draws", "1", "--device", "cpu"])
    assert code == 0, err
    assert "eap edge circuit for pairs.json" in stdout and "CPR" in stdout


@pytest.mark.parametrize("model, extra, fragment", [
    ("gpt2", ["--task", "nope"], "unknown task 'nope'"),
    ("gpt2", ["--task", "facts"], "facts task needs a language model trained on a FactWorld"),
    ("gpt2", ["--task", "EMPTY"], "holds no counterfactual pairs"),
    ("gpt2", ["--task", "PAIRS", "--method", "ablate"], "invalid choice: 'ablate'"),
    ("gpt2", ["--task", "PAIRS", "--method", "mask", "--sparsity", "-1"], "--sparsity -1.0"),
    ("gpt2", ["--task", "PAIRS", "--target", "1.5"], "--target 1.5"),
    ("gpt2", ["--task", "PAIRS", "--out", "EXISTING"], "exists; give a new folder"),
    ("gpt2", ["--task", "trojan:patch-universal"], "trojan tasks need an image classifier"),
    ("zoo:factgpt", ["--task", "trojan:patch-universal"], "trojan tasks need an image classifier"),
    ("zoo:shapesnet", ["--task", "facts"], "facts task needs a language model"),
    ("zoo:shapesnet", ["--task", "trojan:patch-universal", "--level", "edge"], "edge-level circuits need a transformer"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_model_dirs: dict[str, Path], pairs_file: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            model: str, extra: list[str], fragment: str) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    existing = tmp_path / "existing"
    existing.mkdir()
    out = tmp_path / "new-out"
    swap = {"EMPTY": str(empty), "PAIRS": str(pairs_file), "EXISTING": str(existing)}
    extra = [swap.get(a, a) for a in extra]
    if "--out" not in extra:
        extra += ["--out", str(out)]
    spec = str(tiny_model_dirs[model]) if model in tiny_model_dirs else model
    code, stdout, err = _run(capsys, ["circuit", spec, *extra, "--device", "cpu", "--json"])
    assert code == 2
    assert stdout == ""
    assert len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not out.exists() and list(existing.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.json", "existing", "pairs.json"]
