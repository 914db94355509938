"""`workbench das`: bad input exits 2 with one line and writes nothing; on the zoo models (slow) it writes
das.json and das.png with every method's IIA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench_cli.main import main


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def other_site_sae(tmp_path: Path) -> Path:
    from workbench.dictionaries.sae import DictionaryConfig, SparseDictionary

    path = tmp_path / "sae"
    SparseDictionary(DictionaryConfig(kind="relu", d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post")).save(path)
    return path


@pytest.fixture
def other_model_sae(tmp_path: Path) -> Path:
    from workbench.dictionaries.sae import DictionaryConfig, SparseDictionary

    path = tmp_path / "sae-other-model"
    config = DictionaryConfig(kind="relu", d_in=32, d_sae=64, hook_name="blocks.0.hook_resid_post",
                              metadata={"model_fingerprint": "0" * 64})
    SparseDictionary(config).save(path)
    return path


@pytest.mark.parametrize("changes, fragment", [
    ({"--variable": "subject"}, "has no world with known variables"),
    ({"--variable": "shape"}, "has no world with known variables"),
    ({"--variable": "size"}, "invalid choice: 'size'"),
    ({"--site": "blocks.9.hook_resid_post"}, "blocks.9.hook_resid_post"),
    ({"--dim": "0"}, "0 is out of range"),
    ({"--dim": "33"}, "--dim 33 is larger than site blocks.0.hook_resid_post's width 32"),
    ({"--sae": "SAE"}, "was trained on site 'blocks.1.hook_resid_post', not 'blocks.0.hook_resid_post'"),
    ({"--sae": "MISSING"}, "is not a folder"),
    ({"--sae": "OTHER_MODEL"}, "trained on a model with fingerprint 000000000000"),
    ({"--held-out": "1.5"}, "--held-out 1.5"),
    ({"--out": "EXISTING"}, "exists; give a new folder"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tiny_model_dirs: dict[str, Path], other_site_sae: Path,
                                                            other_model_sae: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            changes: dict[str, str], fragment: str) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    out = tmp_path / "out"
    swap = {"SAE": str(other_site_sae), "OTHER_MODEL": str(other_model_sae), "MISSING": str(tmp_path / "missing"), "EXISTING": str(existing)}
    options = {"--variable": "subject", "--site": "blocks.0.hook_resid_post", "--out": str(out), "--device": "cpu"}
    options.update({flag: swap.get(value, value) for flag, value in changes.items()})
    argv = ["das", str(tiny_model_dirs["gpt2"]), *[x for item in options.items() for x in item], "--json"]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = _run(capsys, argv)
    assert code == 2, err
    assert stdout == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert list(existing.iterdir()) == []


@pytest.mark.slow
def test_shape_is_not_a_factgpt_variable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests import zoo_models

    zoo_models.factgpt()  # trained and cached on first use
    out = tmp_path / "out"
    code, _, err = _run(capsys, ["das", "zoo:factgpt", "--variable", "shape", "--site", "blocks.0.hook_resid_post",
                                      "--out", str(out), "--device", "cpu"])
    assert code == 2 and "variable 'shape' is not in zoo:factgpt's world; choose subject or relation" in err
    assert not out.exists()


@pytest.mark.slow
def test_das_on_factgpt_writes_json_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests import zoo_models

    zoo_models.factgpt()
    out = tmp_path / "das"
    code, stdout, err = _run(capsys, ["das", "zoo:factgpt", "--variable", "subject", "--site", "blocks.0.hook_resid_post",
                                      "--dim", "8", "--n", "300", "--steps", "60", "--out", str(out), "--device", "cpu",
                                      "--threads", "1", "--json"])
    assert code == 0, err
    doc = json.loads(stdout)
    methods = {m["method"]: m for m in doc["methods"]}
    assert set(methods) == {"das", "probe", "leace", "diff_means", "neurons", "random", "full"}
    assert doc["no_intervention_iia"] == 0.0
    # the subject is at the subject's last token after layer 0: a learned or supervised subspace moves the
    # answer far more often than a random one
    assert methods["das"]["iia"] > methods["random"]["iia"] + 0.2
    assert methods["diff_means"]["iia"] > methods["random"]["iia"] + 0.2
    assert json.loads((out / "das.json").read_text())["methods"] == doc["methods"]
    assert (out / "das.png").read_bytes()[:4] == b"\x89PNG"
