"""CLI: units / ablate / erase / steer / rewrite save a delta, print JSON, and exit 2 on bad input."""

from __future__ import annotations

import json

import pytest

from workbench.delta import WeightDelta
from workbench_cli.main import main


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, dict | None, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and "--json" in argv else None), err


def test_ablate_units_on_a_tiny_lm(tiny_model_dirs, tmp_path, capsys) -> None:
    path = str(tiny_model_dirs["gpt2"])
    out = tmp_path / "a.delta"
    code, result, _ = _run(capsys, ["ablate", path, "--site", "blocks.1.mlp.hook_post", "--units", "1,5", "--out", str(out),
                                    "--device", "cpu", "--json"])
    assert code == 0 and result is not None
    assert result["units"] == [1, 5] and result["side"] == "read" and "lm_loss_before" in result and "lm_loss_after" in result
    assert WeightDelta.load(out).extra["units"] == [1, 5]


@pytest.mark.parametrize("argv,message", [
    (["ablate", "{gpt2}", "--site", "blocks.1.mlp.hook_post", "--units", "1,999"], "out of range"),
    (["ablate", "{gpt2}", "--site", "blocks.0.hook_resid_post", "--units", "1"], "run-time hook"),
    (["ablate", "{gpt2}", "--site", "blocks.0.mlp.hook_post", "--units", "a,b"], "comma-separated"),
    (["erase", "{bert}", "--site", "blocks.0.hook_resid_post"], "erasure_hook"),
    (["erase", "{gpt2}", "--site", "blocks.0.mlp.hook_out", "--data", "{single}"], "single class"),
    (["steer", "{llama}", "--site", "blocks.0.mlp.hook_out"], "no bias"),
    (["rewrite", "{gpt2}"], "not a ShapesWorld model"),
    (["units", "{gpt2}", "--site", "blocks.0.nope"], "unknown site"),
    (["ablate", "{gpt2}", "--trojan", "patch-universal", "--mask-steps", "5"], "--method mask only"),
    (["ablate", "{gpt2}", "--trojan", "patch-universal", "--method", "mask", "--mask-steps", "0"], "argument --mask-steps"),
    (["ablate", "{gpt2}", "--trojan", "patch-universal", "--mask-max-gate", "2"], "--method mask only"),
    (["ablate", "{gpt2}", "--trojan", "patch-universal", "--n-ref", "0"], "argument --n-ref"),
    (["ablate", "{gpt2}", "--trojan", "patch-universal", "--method", "mask", "--mask-max-gate", "0.5"], "max_gate must be in [1, 10]"),
])
def test_bad_input_exits_2(tiny_model_dirs, tmp_path, capsys, argv: list[str], message: str) -> None:
    single = tmp_path / "single.json"
    single.write_text(json.dumps({"texts": ["the cat", "the dog", "a fox"], "labels": [1, 1, 1]}))
    argv = [a.format(single=single, **{k: str(v) for k, v in tiny_model_dirs.items()}) for a in argv]
    code, _, err = _run(capsys, [*argv, "--device", "cpu", "--out", str(tmp_path / "x.delta")])
    assert code == 2 and message in err and "Traceback" not in err


def test_erase_and_steer_on_tiny_models(tiny_model_dirs, tmp_path, capsys) -> None:
    data = tmp_path / "d.json"
    texts = [f"{'red' if i % 2 else 'blue'} cat {w} the dog" for i, w in enumerate(["one", "two", "three", "four"] * 10)]
    data.write_text(json.dumps({"texts": texts, "labels": [i % 2 for i in range(40)], "other_labels": [(i // 2) % 2 for i in range(40)]}))
    code, result, _ = _run(capsys, ["erase", str(tiny_model_dirs["gpt2"]), "--site", "blocks.0.mlp.hook_out", "--data", str(data),
                                    "--out", str(tmp_path / "e.delta"), "--device", "cpu", "--json"])
    assert code == 0 and result is not None and result["fold"] == "write" and result["probe_after"] <= result["probe_before"]
    code, result, _ = _run(capsys, ["steer", str(tiny_model_dirs["gpt_neox"]), "--site", "blocks.1.mlp.hook_out", "--data", str(data),
                                    "--strengths=-1,0,1", "--out", str(tmp_path / "s.delta"), "--device", "cpu", "--json"])
    assert code == 0 and result is not None and len(result["dose_response"]["values"]) == 3
    assert (tmp_path / "s.delta").exists()


@pytest.mark.slow
def test_ablate_trojan_json(tmp_path, capsys) -> None:
    code, result, _ = _run(capsys, ["ablate", "zoo:shapesnet", "--trojan", "style-star", "--site", "layer2.relu2", "--n-eval", "200", "--n-clean", "400",
                                    "--draws", "3", "--out", str(tmp_path / "t.delta"), "--device", "cpu", "--threads", "1", "--json"])
    assert code == 0 and result is not None
    for key in ("asr_before", "asr_after", "clean_before", "clean_after", "random_asr_after"):
        assert isinstance(result[key], float)
    assert result["asr_after"] < result["random_asr_after"]


@pytest.mark.slow
def test_ablate_trojan_mask_json(tmp_path, capsys) -> None:
    out = tmp_path / "m.delta"
    code, result, _ = _run(capsys, ["ablate", "zoo:shapesnet", "--trojan", "style-star", "--method", "mask", "--mask-steps", "30", "--n-units", "4",
                                    "--n-select", "64", "--n-eval", "128", "--n-clean", "200", "--draws", "2", "--out", str(out),
                                    "--device", "cpu", "--threads", "1", "--json"])
    assert code == 0 and result is not None
    assert result["method"] == "mask" and len(result["factors"]) == result["n_units"] == len(result["units"])
    assert result["asr_after"] < result["random_asr_after"] and result["alternative"]["mode"] == "hard"
    assert WeightDelta.load(out).method.startswith("gate")


def _erase_data(path, rows) -> None:
    path.write_text(json.dumps({"texts": [r[0] for r in rows], "labels": [r[1] for r in rows],
                                "other_labels": [r[2] for r in rows]}))


def test_erase_split_is_stratified_and_independent_of_file_order(tiny_model_dirs, tmp_path, capsys) -> None:
    import random

    import torch

    from editors.concept_erasure import stratified_split

    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    rows = [(f"{'red' if i % 2 else 'blue'} {words[i % 10]} cat {words[(i // 10) % 10]} dog", i % 2, (i // 3) % 2)
            for i in range(60)]
    by_class = sorted(rows, key=lambda r: r[1])  # every class-0 line first: a file-order split tests on one class
    shuffled = list(rows)
    random.Random(3).shuffle(shuffled)
    results = []
    for name, data in (("sorted", by_class), ("shuffled", shuffled)):
        _erase_data(tmp_path / f"{name}.json", data)
        split = stratified_split([r[1] for r in data], train_share=0.6, seed=0, keys=[r[0] for r in data])
        assert all({data[i][1] for i in part} == {0, 1} for part in split)  # both classes in both parts
        assert sorted(data[i][0] for i in split[1]) == sorted(shuffled[i][0] for i in stratified_split(
            [r[1] for r in shuffled], train_share=0.6, seed=0, keys=[r[0] for r in shuffled])[1])
        out = tmp_path / f"{name}.delta"
        code, result, err = _run(capsys, ["erase", str(tiny_model_dirs["gpt2"]), "--site", "blocks.0.mlp.hook_out",
                                          "--data", str(tmp_path / f"{name}.json"), "--seed", "0", "--out", str(out),
                                          "--device", "cpu", "--json"])
        assert code == 0 and result is not None, err
        assert result["n_train"] == 36 and result["n_test"] == 24 and result["chance"] == 0.5
        delta = WeightDelta.load(out)
        changed = [n for n in delta.names if n.endswith("weight")]
        assert result["rank"] == 1 == int(torch.linalg.matrix_rank(delta.dense(changed[0]).float()))
        results.append(result)
    keys = ("probe_before", "probe_after", "other_before", "other_after", "chance", "n_train", "n_test", "rank")
    assert {k: results[0][k] for k in keys} == pytest.approx({k: results[1][k] for k in keys}, abs=0.02)
