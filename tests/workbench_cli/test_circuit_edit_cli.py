"""`workbench ablate-circuit`: a tiny GPT-2's circuit folded into a delta that loads and applies to that model,
and bad input exits 2 with one line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.workbench.circuits.conftest import PAIRS
from workbench.circuits import Circuit, component_graph
from workbench.circuits.tasks import logits_of
from workbench.delta import WeightDelta
from workbench.fingerprint import model_fingerprint
from workbench.models import load, run_model
from workbench_cli.main import main


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    h = load(str(tiny_model_dirs["gpt2"]), device="cpu", progress=False)
    g = component_graph(h)
    comps = g.components("node")
    kept = {"a0.h1", "a1.h3", "m1"}
    circuit = Circuit(model=h.spec, fingerprint=model_fingerprint(h.model), task="pairs", method="eap", level="node",
                      components=tuple(comps), scores=tuple(float(len(comps) - i) for i in range(len(comps))),
                      kept=tuple(c in kept for c in comps))
    empty = Circuit(model=h.spec, fingerprint=circuit.fingerprint, task="pairs", method="eap", level="node",
                    components=circuit.components, scores=circuit.scores, kept=tuple(False for _ in comps))
    reference = tmp_path / "texts.json"
    reference.write_text(json.dumps([p["clean"] for p in PAIRS]))
    return {"circuit": circuit.save(tmp_path / "circuit.json"), "empty": empty.save(tmp_path / "empty.json"),
            "reference": reference}


def test_ablate_circuit_writes_a_delta_that_applies(tiny_model_dirs: dict[str, Path], files: dict[str, Path],
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "abl"
    model = str(tiny_model_dirs["gpt2"])
    code, stdout, err = _run(capsys, ["ablate-circuit", model, "--circuit", str(files["circuit"]), "--reference",
                                      str(files["reference"]), "--out", str(out), "--device", "cpu", "--json"])
    assert code == 0, err
    r = json.loads(stdout)
    assert r["nodes"] == ["a0.h1", "a1.h3", "m1"]  # graph order
    assert r["value"] == "mean" and any("c_proj.bias" in p for p in r["params"])
    assert json.loads((out / "result.json").read_text())["nodes"] == r["nodes"]
    delta = WeightDelta.load(out / "delta.safetensors")
    assert delta.method == "circuit-ablate"
    h = load(model, device="cpu", progress=False)
    before = model_fingerprint(h.model)
    x = dict(h.tokenizer(["the capital of rome is"], return_tensors="pt"))
    with torch.no_grad():
        clean = logits_of(run_model(h.model, x))
        with delta.applied(h.model):
            edited = logits_of(run_model(h.model, x))
    assert float((edited - clean).abs().max()) > 1e-4 and model_fingerprint(h.model) == before

    code, stdout, err = _run(capsys, ["ablate-circuit", model, "--circuit", str(files["circuit"]), "--top", "2",
                                      "--complement", "--value", "zero", "--out", str(tmp_path / "abl2"), "--device", "cpu"])
    assert code == 0, err
    assert "zero-ablated 8 node(s)" in stdout and "(its complement)" in stdout  # 10 heads and MLPs less the top 2


@pytest.mark.parametrize("model, extra, fragment", [
    ("gpt_neox", [], "this circuit was found on"),
    ("gpt2", ["--nodes", "a0.h1,a7.h0"], "unknown node 'a7.h0'"),
    ("gpt2", ["--nodes", "input"], "residual stream"),
    ("gpt2", ["--nodes", ","], "names no node"),
    ("gpt2", ["--nodes", "m0", "--top", "2"], "not both"),
    ("gpt2", ["--circuit", "EMPTY"], "selection is empty"),
    ("gpt2", ["--top", "99"], "top 99"),
    ("gpt2", ["--no-reference"], "give --reference texts.json"),
    ("gpt2", ["--out", "EXISTING"], "exists; give a new folder"),
    ("gpt2", ["--trojan", "patch-universal"], "--trojan needs a ShapesNet"),
    ("gpt2", ["--ranking", "bogus"], "invalid choice: 'bogus'"),
    ("gpt2", ["--circuit", "NOT_A_CIRCUIT"], "is not a workbench circuit"),
    ("gpt2", ["--circuit", "MISSING"], "cannot read circuit"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_model_dirs: dict[str, Path], files: dict[str, Path],
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            model: str, extra: list[str], fragment: str) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    out = tmp_path / "new-out"
    argv = ["ablate-circuit", str(tiny_model_dirs[model])]
    if "--circuit" not in extra:
        argv += ["--circuit", str(files["circuit"])]
    if "--no-reference" in extra:
        extra = [a for a in extra if a != "--no-reference"]
    else:
        argv += ["--reference", str(files["reference"])]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"nodes": ["a0.h1"]}))
    swap = {"EMPTY": str(files["empty"]), "EXISTING": str(existing), "NOT_A_CIRCUIT": str(other),
            "MISSING": str(tmp_path / "missing.json")}
    argv += [swap.get(a, a) for a in extra]
    if "--out" not in extra:
        argv += ["--out", str(out)]
    code, stdout, err = _run(capsys, [*argv, "--device", "cpu", "--json"])
    assert code == 2
    assert stdout == ""
    assert len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not out.exists() and list(existing.iterdir()) == []
