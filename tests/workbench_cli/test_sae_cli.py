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


def test_ablate_writes_a_delta_and_refuses_bad_latents_and_unfoldable_sites(
        tiny_model_dirs: dict[str, Path], corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from workbench.delta import WeightDelta

    model = str(tiny_model_dirs["gpt2"])
    folders = {}
    for site in ("blocks.1.mlp.hook_out", "blocks.1.hook_resid_post"):
        folders[site] = tmp_path / site.replace(".", "_")
        code, _, err = _run(capsys, ["sae", "train", model, "--site", site, "--out", str(folders[site]), "--width", "32",
                                     "--k", "4", "--corpus", str(corpus), *SMALL])
        assert code == 0, err
    out = tmp_path / "d.delta.safetensors"
    code, stdout, err = _run(capsys, ["sae", "ablate", model, "--sae", str(folders["blocks.1.mlp.hook_out"]),
                                      "--latent", "1,2", "--out", str(out), "--json"])
    assert code == 0, err
    r = json.loads(stdout)
    assert r["latents"] == [1, 2] and r["rank"] == 2 and r["delta_path"] == str(out)
    assert WeightDelta.load(out).method == "sae-ablate"
    for latent, fragment in (("99", "latent 99 is out of range"), ("x", "expected comma-separated latent indices")):
        code, stdout, err = _run(capsys, ["sae", "ablate", model, "--sae", str(folders["blocks.1.mlp.hook_out"]),
                                          "--latent", latent, "--out", str(tmp_path / "e.safetensors")])
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "e.safetensors").exists()
    code, _, err = _run(capsys, ["sae", "ablate", model, "--sae", str(folders["blocks.1.hook_resid_post"]),
                                 "--latent", "1", "--out", str(tmp_path / "f.safetensors")])
    assert code == 2 and "residual stream" in err and not (tmp_path / "f.safetensors").exists()


@pytest.mark.slow
def test_ablate_measures_a_trojan_beside_random_latents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sae = tmp_path / "sae"
    code, _, err = _run(capsys, ["sae", "train", "zoo:shapesnet", "--site", "layer3.conv1", "--out", str(sae), "--width",
                                 "128", "--k", "8", "--n-activations", "65536", "--eval-activations", "4096",
                                 "--device", "cpu"])
    assert code == 0, err
    code, stdout, err = _run(capsys, ["sae", "ablate", "zoo:shapesnet", "--sae", str(sae), "--latent", "3,5",
                                      "--trojan", "patch-universal", "--n-eval", "64", "--n-clean", "128", "--draws", "2",
                                      "--out", str(tmp_path / "d.safetensors"), "--device", "cpu", "--json"])
    assert code == 0, err
    r = json.loads(stdout)
    assert r["asr_before"] > 0.8 and 0 <= r["asr_after"] <= 1 and len(r["random"]) == 2
    assert all(not set(c["latents"]) & {3, 5} and len(c["latents"]) == 2 for c in r["random"])
    assert r["random_asr_after"] == pytest.approx(sum(c["asr_after"] for c in r["random"]) / 2)
    assert r["value"] == "zero" and r["changed"] == ["layer3.conv1.weight"]
    code, stdout, err = _run(capsys, ["sae", "ablate", "zoo:shapesnet", "--sae", str(sae), "--latent", "3,5",
                                      "--value", "mean", "--mean-chunks", "1", "--trojan", "patch-universal",
                                      "--n-eval", "64", "--n-clean", "128", "--draws", "1",
                                      "--out", str(tmp_path / "m.safetensors"), "--device", "cpu", "--json"])
    assert code == 0, err
    m = json.loads(stdout)
    assert m["value"] == "mean" and sorted(m["changed"]) == ["layer3.bn1.bias", "layer3.conv1.weight"]
    assert m["asr_before"] == r["asr_before"] and 0 <= m["asr_after"] <= 1


def test_steer_writes_a_bias_delta_and_refuses_a_bias_free_writer(tiny_model_dirs: dict[str, Path], corpus: Path,
                                                                  tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from workbench.delta import WeightDelta

    for family, ok in (("gpt2", True), ("llama", False)):
        sae = tmp_path / f"sae-{family}"
        code, _, err = _run(capsys, ["sae", "train", str(tiny_model_dirs[family]), "--site", "blocks.1.mlp.hook_out",
                                     "--out", str(sae), "--width", "32", "--k", "4", "--corpus", str(corpus), *SMALL])
        assert code == 0, err
        out = tmp_path / f"{family}.delta.safetensors"
        code, stdout, err = _run(capsys, ["sae", "steer", str(tiny_model_dirs[family]), "--sae", str(sae), "--latent",
                                          "3", "--strength", "2.5", "--out", str(out), "--json"])
        if ok:
            assert code == 0, err
            r = json.loads(stdout)
            assert r["param"].endswith(".bias") and r["norm"] == pytest.approx(2.5, rel=1e-5)
            assert WeightDelta.load(out).method == "steer"
        else:
            assert code == 2 and "no bias" in err and len(err.strip().splitlines()) == 1 and not out.exists()
