"""`workbench sae train | features | quality` on a tiny GPT-2 folder with a corpus and labelled texts; bad
input exits 2 with one line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workbench_cli.main import main

CORPUS = [f"the {a} of {b} is {c}" for a in ("cat", "dog", "sun", "sea") for b in ("red", "blue", "old", "new")
          for c in ("here", "there", "big")]
SMALL = ["--n-activations", "4096", "--batch-size", "256", "--eval-activations", "1024", "--no-cache"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS))
    return path


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_then_features_and_quality(tiny_model_dirs: dict[str, Path], corpus: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    model = str(tiny_model_dirs["gpt2"])
    out = tmp_path / "sae"
    code, stdout, err = _run(capsys, ["sae", "train", model, "--site", "blocks.1.hook_resid_post", "--out", str(out),
                                      "--kind", "topk", "--width", "48", "--k", "4", "--corpus", str(corpus), *SMALL,
                                      "--device", "cpu", "--json"])
    assert code == 0, err
    r = json.loads(stdout)
    assert r["path"] == str(out) and r["l0"] <= 4 and 0 < r["explained_variance"] <= 1
    assert (out / "cfg.json").is_file() and (out / "sae_weights.safetensors").is_file()
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"texts": CORPUS, "labels": {"animal": [int(t.split()[1] in ("cat", "dog"))
                                                                           for t in CORPUS]}}))
    code, stdout, err = _run(capsys, ["sae", "features", model, "--sae", str(out), "--labels", str(labels),
                                      "--bootstrap", "50", "--device", "cpu", "--json"])
    assert code == 0, err
    feats = json.loads(stdout)["features"]
    assert [f["feature"] for f in feats] == ["animal"]
    for key in ("best_latent", "auroc", "diffmean_auroc", "probe_auroc"):
        assert key in feats[0], key
    code, stdout, err = _run(capsys, ["sae", "quality", model, "--sae", str(out), "--corpus", str(corpus),
                                      "--n-activations", "1024", "--device", "cpu", "--json"])
    assert code == 0, err
    assert json.loads(stdout)["l0"] <= 4


@pytest.mark.parametrize("extra, fragment", [
    (["--width", "0"], "--width: 0 is out of range; give a positive integer"),
    (["--width", "8", "--k", "9"], "--k 9 exceeds --width 8"),
    (["--kind", "relu", "--k", "3"], "--k is a TopK setting"),
    (["--kind", "gated"], "invalid choice: 'gated'"),
])
def test_bad_train_options_exit_2_with_one_line(extra: list[str], fragment: str, tiny_model_dirs: dict[str, Path],
                                                corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sae"
    code, stdout, err = _run(capsys, ["sae", "train", str(tiny_model_dirs["gpt2"]), "--site", "blocks.1.hook_resid_post",
                                      "--out", str(out), "--corpus", str(corpus), *SMALL, *extra])
    assert code == 2 and stdout == "" and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_an_unknown_site_and_another_models_dictionary_are_refused(tiny_model_dirs: dict[str, Path], corpus: Path,
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, ["sae", "train", str(tiny_model_dirs["gpt2"]), "--site", "blocks.7.hook_resid_post",
                                 "--out", str(tmp_path / "x"), "--corpus", str(corpus), *SMALL])
    assert code == 2 and "blocks.7" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    out = tmp_path / "sae"
    code, _, err = _run(capsys, ["sae", "train", str(tiny_model_dirs["gpt2"]), "--site", "blocks.1.hook_resid_post",
                                 "--out", str(out), "--corpus", str(corpus), "--width", "32", "--k", "4", *SMALL])
    assert code == 0, err
    code, stdout, err = _run(capsys, ["sae", "quality", str(tiny_model_dirs["llama"]), "--sae", str(out),
                                      "--corpus", str(corpus), "--n-activations", "256"])
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1
    assert "trained on a model with fingerprint" in err, err
    code, _, err = _run(capsys, ["sae", "train", str(tiny_model_dirs["gpt2"]), "--site", "blocks.1.hook_resid_post",
                                 "--out", str(out), "--corpus", str(corpus), *SMALL])
    assert code == 2 and "exists" in err  # never over an earlier dictionary
