"""The Circuit object: JSON round trip, atomic save, refusal on another model, corrupt files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.workbench.circuits.conftest import PAIRS
from workbench.circuits import Circuit, DiscoveryConfig, find_circuit
from workbench.circuits.tasks import pairs_task
from workbench.errors import CorruptFileError, FingerprintMismatchError, WorkbenchError
from workbench.handle import ModelHandle


@pytest.fixture
def circuit(load_tiny: Callable[[str], ModelHandle]) -> Circuit:
    h = load_tiny("gpt2")
    return find_circuit(h, pairs_task(h, PAIRS, name="pairs"), DiscoveryConfig(method="eap", level="edge", random_draws=1))


def test_round_trip_and_views(circuit: Circuit, tmp_path: Path, load_tiny: Callable[[str], ModelHandle]) -> None:
    path = circuit.save(tmp_path / "c.json")
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary file left beside it
    back = Circuit.load(path)
    assert back == circuit
    assert back.edges and all("->" not in u and "->" not in v for u, v in back.edges)
    assert set(back.nodes) == {x for e in back.edges for x in e}
    assert len(back.components) == 33 and sum(back.kept) == len(back.edges)
    back.check_model(load_tiny("gpt2"))  # the same weights load fine


def test_another_models_circuit_is_refused(circuit: Circuit, load_tiny: Callable[[str], ModelHandle]) -> None:
    other = load_tiny("gpt2")
    next(other.model.parameters()).data[0, 0] += 1.0
    with pytest.raises(FingerprintMismatchError, match="find the circuit again on this model"):
        circuit.check_model(other)
    with pytest.raises(FingerprintMismatchError):
        circuit.check_model(load_tiny("llama"))


def test_bad_files_are_one_clear_error(circuit: Circuit, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        Circuit.load(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CorruptFileError, match="not a workbench circuit"):
        Circuit.load(bad)
    obj = circuit.to_json()
    del obj["scores"]
    bad.write_text(json.dumps(obj))
    with pytest.raises(CorruptFileError, match="missing"):
        Circuit.load(bad)
    with pytest.raises(WorkbenchError, match="cannot read circuit"):
        Circuit.load(tmp_path / "absent.json")
    with pytest.raises(WorkbenchError, match="one of each per component"):
        Circuit("m", "f", "t", "eap", "node", ("a", "b"), (1.0,), (True, False))


def test_plot_lays_out_cnn_channels_and_transformer_nodes(cnn_handle: ModelHandle, circuit: Circuit,
                                                          tmp_path: Path) -> None:
    import torch

    from workbench.circuits import CircuitTask, ClassLogit
    from workbench.circuits.plots import _matrix, plot_circuit

    g = torch.Generator().manual_seed(0)
    task = CircuitTask("cnn", torch.rand(4, 3, 16, 16, generator=g), torch.rand(4, 3, 16, 16, generator=g), ClassLogit(1))
    cnn = find_circuit(cnn_handle, task, DiscoveryConfig(method="eap", level="node", random_draws=1))
    values, mask, rows, cols = _matrix(cnn)
    assert rows == ["features"] and values.shape == (1, 16) and mask.sum() == sum(cnn.kept)
    values, mask, rows, cols = _matrix(circuit)
    assert rows[-1] == "logits" and cols[0] == "input" and mask.sum() == len(circuit.edges)
    for c, name in ((cnn, "cnn.png"), (circuit, "edges.png")):
        assert plot_circuit(c, tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.png", "edges.png"]
