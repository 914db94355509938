"""`workbench reproduce --suite ... --suite-seed ... --model ROLE=SPEC`: bad input exits 2 with one line
that says what would be right; nothing runs and no study folder is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from workbench_cli.main import main


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("args, fragment", [
    (["--suite", "nope"], "invalid choice: 'nope' (choose from 'dev', 'heldout')"),
    (["--suite", "heldout", "--suite-seed", "-1"], "-1 is out of range; give a seed 0.."),
    (["--suite", "heldout", "--suite-seed", "x"], "'x' is not an integer"),
    (["--suite", "heldout", "--suite-seed", "0"], "seed 0 drew the development models"),
    (["--suite", "heldout"], "--suite heldout needs --suite-seed N"),
    (["--suite", "dev", "--suite-seed", "3"], "--suite-seed applies to --suite heldout"),
    (["--model", "llm=gpt2"], "suite dev has no role 'llm'; its roles: factgpt (a causal LM"),
    (["--model", "factgpt"], "expected ROLE=SPEC"),
    (["--model", "factgpt="], "give a model spec after '='"),
    (["9", "--model", "factgpt=zoo:factgpt@3"], "none of the studies asked for runs on role 'factgpt'; they use minilm"),
])
def test_bad_suite_input_exits_2_with_one_line(args: list[str], fragment: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    err = _one_line_error(capsys, ["reproduce", *args, "--quick", "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert fragment in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family, role, study, fragment", [
    ("bert", "factgpt", "1", "does not fit role factgpt: it is a masked LM; factgpt needs a causal LM with a tokenizer "
                             "whose folder holds a FactWorld (world.json)"),
    ("gpt2", "factgpt", "2", "does not fit role factgpt: its folder holds no FactWorld (world.json)"),
    ("gpt2", "shapesnet", "10", "does not fit role shapesnet: it is a causal LM; shapesnet needs an image classifier"),
    ("gpt2", "minilm", "9", "does not fit role minilm: it is a causal LM; minilm needs a transformer text encoder"),
])
def test_a_user_model_that_does_not_fit_exits_2_saying_what_fits(
        family: str, role: str, study: str, fragment: str, tiny_model_dirs: dict[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    err = _one_line_error(capsys, ["reproduce", study, "--quick", "--model", f"{role}={tiny_model_dirs[family]}",
                                   "--out", str(out), "--device", "cpu", "--json"])
    assert fragment in err and str(tiny_model_dirs[family]) in err
    assert not any(p.is_dir() for p in out.glob("*")) and not (out / "run.json").exists()
