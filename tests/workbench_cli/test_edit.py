"""`workbench edit`: end to end on a tiny GPT-2 (JSON fields, deltas, saved model) and bad input (exit 2, no delta)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import workbench_cli.main as cli
from workbench.delta import WeightDelta
from workbench.storage import cache_dir
from workbench_cli.edit import add_parsers as add_edit_parser


@pytest.fixture(autouse=True)
def _wired(monkeypatch, tmp_path):
    """Wire `edit` into the CLI parser (the lead does this in build_parser) and use a private cache."""
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    original = cli.build_parser

    def build() -> argparse.ArgumentParser:
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "edit" not in sub.choices:
            add_edit_parser(sub, cli._common, cli._emit)
        return parser

    monkeypatch.setattr(cli, "build_parser", build)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


SINGLE = ("--subject", "vel oran", "--prompt", "the capital of {} is", "--target", "paris", "--target-true", "rome")


def records(path, n: int = 3, drop: str | None = None) -> str:
    subjects = ["vel oran", "tal mira", "red fox", "blue cat"]
    recs = []
    for i in range(n):
        rec = {"case_id": i,
               "requested_rewrite": {"prompt": "the capital of {} is", "subject": subjects[i],
                                     "target_new": {"str": "paris"}, "target_true": {"str": "rome"}},
               "paraphrase_prompts": [f"one two the capital of {subjects[i]} is"],
               "neighborhood_prompts": [f"the capital of {subjects[(i + 1) % 4]} is"],
               "generation_prompts": [f"{subjects[i]} is"]}
        if drop and i == n - 1:
            rec.pop(drop) if drop in rec else rec["requested_rewrite"].pop(drop)
        recs.append(rec)
    path.write_text(json.dumps(recs))
    return str(path)


def test_edit_rome_end_to_end(capsys, tiny_model_dirs, tmp_path) -> None:
    model = str(tiny_model_dirs["gpt2"])
    out_dir, saved = tmp_path / "run", tmp_path / "edited"
    code, out, err = run(capsys, "edit", "rome", model, *SINGLE, "--layer", "0", "--mom2-samples", "500",
                         "--out", str(out_dir), "--save-model", str(saved), "--json", "--device", "cpu")
    assert code == 0, err
    r = json.loads(out)
    assert r["method"] == "rome" and r["n_cases"] == 1 and r["layer"] == 0
    for key in ("ES", "PS", "NS", "S"):
        assert key in r["metrics"] and key in r["unedited"]
    delta = WeightDelta.load(r["delta"])
    assert delta.method == "rome" and r["update_norms"]["0"] == pytest.approx(delta.norms())
    assert (out_dir / "summary.json").is_file() and (out_dir / "cases").is_dir()

    from transformers import AutoModelForCausalLM

    from workbench.models import load

    edited = AutoModelForCausalLM.from_pretrained(saved).eval()
    h = load(model, device="cpu", progress=False)
    ids = torch.tensor([h.tokenizer("the capital of vel oran is")["input_ids"]])
    with torch.no_grad():
        plain = h.model(input_ids=ids).logits
        with delta.applied(h.model):
            expected = h.model(input_ids=ids).logits
        got = edited(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, plain, atol=1e-6)


def test_edit_memit_records(capsys, tiny_model_dirs, tmp_path) -> None:
    path = records(tmp_path / "recs.json")
    code, out, err = run(capsys, "edit", "memit", str(tiny_model_dirs["llama"]), "--records", path, "--n", "2",
                         "--layer", "0", "--mom2-samples", "500", "--no-fluency", "--out", str(tmp_path / "run"),
                         "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["n_cases"] == 2 and r["editor"]["layers"] == [0]
    assert WeightDelta.load(r["delta"]).method == "memit"
    assert len(list((tmp_path / "run" / "cases").glob("*.json"))) == 2


@pytest.mark.parametrize("args, message", [
    (("--subject", "vel oran", "--prompt", "the capital of tal mira is", "--target", "paris"), "tokens are"),
    (("--subject", "vel oran", "--prompt", "the capital of {} is", "--target", "  "), "target"),
    (SINGLE + ("--layer", "9"), "out of range"),
])
def test_bad_single_input(capsys, tiny_model_dirs, tmp_path, args, message) -> None:
    out_dir = tmp_path / "run"
    code, out, err = run(capsys, "edit", "rome", str(tiny_model_dirs["gpt2"]), *args, "--out", str(out_dir))
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.safetensors"))


def test_bad_records(capsys, tiny_model_dirs, tmp_path) -> None:
    path = records(tmp_path / "recs.json", drop="subject")
    code, out, err = run(capsys, "edit", "memit", str(tiny_model_dirs["gpt2"]), "--records", path,
                         "--out", str(tmp_path / "run"))
    assert code == 2
    assert "record 2" in err and "subject" in err
    assert not list(tmp_path.rglob("*.safetensors"))


def test_save_model_needs_one_case_for_single_edit_methods(capsys, tiny_model_dirs, tmp_path) -> None:
    path = records(tmp_path / "recs.json")
    code, _, err = run(capsys, "edit", "rome", str(tiny_model_dirs["gpt2"]), "--records", path,
                       "--save-model", str(tmp_path / "m"))
    assert code == 2 and "--save-model" in err
    assert not (tmp_path / "m").exists()


# The shared zoo cache, taken at import before the autouse fixture redirects WORKBENCH_CACHE
# (a private cache would retrain FactGPT inside the test).
SHARED_CACHE = cache_dir()


@pytest.mark.slow
def test_edit_factgpt_saved_model_answers(capsys, tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.models import load

    monkeypatch.setenv("WORKBENCH_CACHE", str(SHARED_CACHE))
    h = load("zoo:factgpt", device="cpu", progress=False)
    rec = h.info["world"].counterfact_records(1, seed=3)[0]
    rw = rec["requested_rewrite"]
    saved = tmp_path / "edited"
    code, out, err = run(capsys, "edit", "rome", "zoo:factgpt", "--subject", rw["subject"], "--prompt", rw["prompt"],
                         "--target", rw["target_new"]["str"], "--layer", "0",
                         "--save-model", str(saved), "--json", "--device", "cpu")
    assert code == 0, err
    r = json.loads(out)
    assert r["metrics"]["ES"] == 100.0 and r["unedited"]["ES"] == 0.0
    model = AutoModelForCausalLM.from_pretrained(saved).eval()
    tok = AutoTokenizer.from_pretrained(saved)
    ids = tok(rw["prompt"].format(rw["subject"]), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        top = int(model(input_ids=ids).logits[0, -1].argmax())
    assert tok.decode([top]).strip() == rw["target_new"]["str"]
    assert r["hint"] is None  # the edit took: nothing to suggest


@pytest.mark.slow
def test_edit_without_layer_uses_the_shipped_layer_and_a_wrong_layer_says_what_to_try(capsys, monkeypatch) -> None:
    # FactGPT ships the layer its facts are edited at (layer 0, key at the subject's last token); the middle
    # layer (2 of 4), ROME's own default, is not where they are stored
    from workbench.models import load

    monkeypatch.setenv("WORKBENCH_CACHE", str(SHARED_CACHE))
    rw = load("zoo:factgpt", device="cpu", progress=False).info["world"].counterfact_records(1, seed=3)[0]["requested_rewrite"]
    argv = ["edit", "rome", "zoo:factgpt", "--subject", rw["subject"], "--prompt", rw["prompt"],
            "--target", rw["target_new"]["str"], "--device", "cpu"]
    code, out, err = run(capsys, *argv, "--json")
    r = json.loads(out)
    assert code == 0 and r["layer"] == 0 and "ships" in r["layer_source"]
    assert r["metrics"]["ES"] == 100.0 and r["hint"] is None
    code, out, err = run(capsys, *argv, "--layer", "2", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["metrics"]["ES"] < 50 and "--layer auto" in r["hint"]
    code, out, err = run(capsys, *argv, "--layer", "auto", "--json")  # following the hint makes it take
    r = json.loads(out)
    assert code == 0 and r["metrics"]["ES"] == 100.0 and r["hint"] is None and r["layer_source"].startswith("traced")


def test_hint_names_crowded_keys_for_a_batch_edit_that_took_partly() -> None:
    from editors.memit import MEMIT
    from workbench_cli.edit import _hint

    editor = MEMIT(layers=(0,))
    crowded = {"per_layer": [{"layer": 0, "self_share": 0.72}]}
    hint = _hint(editor, {"ES": 85.4}, False, crowded)
    assert "72%" in hint and "fewer edits" in hint.lower()
    assert _hint(editor, {"ES": 85.4}, False, {"per_layer": [{"layer": 0, "self_share": 0.95}]}) is None
    assert _hint(editor, {"ES": 100.0}, False, crowded) is None  # it took: nothing to suggest
    assert "--layer auto" in _hint(editor, {"ES": 10.0}, False, crowded)  # not taking at all: the layer comes first
    # half the edits taking is no better than a coin (ROME at its default layer on FactGPT-large: ES 50.0)
    assert "--layer auto" in _hint(editor, {"ES": 50.0}, False, None)
    assert _hint(editor, {"ES": 50.0}, True, None) is None  # the layer came from a trace already


def test_result_names_the_layers_an_edit_changed() -> None:
    from editors.memit import MEMIT
    from editors.rome import ROME
    from workbench_cli.edit import _edited_layers

    class Fitted:
        def __init__(self, extra: dict) -> None:
            self.extra = extra

    assert _edited_layers(MEMIT(layers=(0, 1)), []) == [0, 1]  # as configured
    assert _edited_layers(MEMIT(), [Fitted({"layers": [1, 2]})]) == [1, 2]  # the default range, as recorded
    assert _edited_layers(ROME(), [Fitted({"layer": 2}), Fitted({"layer": 2})]) == 2
    assert _edited_layers(ROME(), []) is None


def test_existing_out_folder_is_refused_before_anything_runs(capsys, tiny_model_dirs, tmp_path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("earlier results")
    code, _, err = run(capsys, "edit", "rome", str(tiny_model_dirs["gpt2"]), *SINGLE, "--layer", "0",
                       "--out", str(tmp_path / "run"))
    assert code == 2 and "exists" in err
    assert (tmp_path / "run" / "keep.txt").read_text() == "earlier results" and not list(tmp_path.rglob("*.json"))
