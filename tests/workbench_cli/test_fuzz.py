"""Every command, fed malformed input, exits 2 with one line on stderr and creates nothing.

A table covers each command's flags with one bad value of each kind (paths that cannot be
written or already exist, NaN / infinite / zero / negative / huge numbers, unparsable lists,
malformed JSON files, model specs that name nothing); Hypothesis then draws many more values
of the same kinds (derandomized, so a failure reproduces). Each case runs in-process through
`main(argv)` in a fresh temporary folder, which is the working folder and holds `--out`: it
must look the same afterwards.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench_cli.main import main

FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def blocker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain file: any output path below it cannot be created."""
    path = tmp_path_factory.mktemp("blocker") / "a-file"
    path.write_text("not a folder\n")
    return path


@contextmanager
def _inside(folder: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], *, extra: tuple[str, ...] = (),
            files: dict[str, str | bytes] | None = None, **paths: str) -> str:
    """Run `argv` + `extra` in a fresh folder D (the working folder); assert exit 2, one stderr line,
    nothing created.

    `{D}` in argv is that folder, `{name}` any of `paths` (`extra` is taken literally); `files`
    are written into D first (and must be all that D holds afterwards). Returns the error line.
    """
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        folder = Path(tmp)
        for name, content in (files or {}).items():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content)
        before = _tree(folder)
        args = [a.format(D=folder, **paths) for a in argv] + list(extra)
        capsys.readouterr()
        with _inside(folder):
            try:
                code = main(args)
            except SystemExit as exc:
                code = exc.code
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        shown = " ".join(args)
        assert code == 2, f"{shown}: exit {code}\n{err[-2000:]}"
        assert "Traceback" not in err, f"{shown}:\n{err[-2000:]}"
        assert len(lines) == 1, f"{shown}: {len(lines)} lines on stderr:\n{err[-2000:]}"
        assert "error" in lines[0], lines[0]
        assert out == "", f"{shown}: stdout {out[:200]!r}"
        assert _tree(folder) == before, f"{shown} left {sorted(set(_tree(folder)) - set(before))}"
        return lines[0]


# --- the table: each command, each kind of bad input --------------------------------------------

LONG = "{{}} is in " + "the " * 80
SITE = ["--site", "blocks.0.mlp.hook_post"]
RESID = ["--site", "blocks.0.mlp.hook_out"]  # foldable: erase and steer write it through c_proj
EDIT = ["edit", "rome", "{gpt2}", "--subject", "paris", "--prompt", "{{}} is in", "--target", "rome", "--no-fluency"]
TRACE = ["trace", "{gpt2}", "--prompt", "{{}} is in", "--subject", "paris", "--out", "{D}/t"]
NEURONS = ["neurons", "{gpt2}", "--prompt", "paris is in", "--target", "red"]

TABLE: list[tuple[list[str], str]] = [
    # output paths that cannot be written, or exist
    ([*TRACE[:-1], "{blocker}/t"], "cannot create"),
    ([*TRACE[:-1], "{D}"], "exists"),
    ([*EDIT, "--out", "{blocker}/e"], "cannot create"),
    ([*EDIT, "--save-model", "{blocker}/m"], "cannot create"),
    ([*EDIT, "--out", "{D}/same", "--save-model", "{D}/same"], "two different"),
    (["ablate", "{gpt2}", *SITE, "--units", "1", "--out", "{blocker}/d.safetensors"], "not a folder"),
    (["ablate", "{gpt2}", *SITE, "--units", "1", "--out", "{D}"], "exists"),
    (["erase", "{gpt2}", *RESID, "--n", "8", "--out", "{blocker}/d"], "not a folder"),
    (["steer", "{gpt2}", *RESID, "--n", "8", "--plot", "{blocker}/p.png", "--out", "{D}/s"], "--plot"),
    (["units", "{gpt2}", *SITE, "--concept", "sentiment", "--n", "8", "--plot", "{blocker}/p.png"], "--plot"),
    (["rewrite", "{gpt2}", "--out", "{blocker}/r"], "not a folder"),
    (["world", "export", "factworld", "--n", "3", "--out", "{blocker}/x.json"], "not a folder"),
    (["world", "render", "shapesworld", "--out", "{blocker}/x.png"], "not a folder"),
    (["reproduce", "1", "--out", "{blocker}/r"], "cannot create"),
    (["reproduce", "1", "--out", "{blocker}"], "not a folder"),
    (["demo", "--out", "{blocker}/d"], "cannot create"),
    (["tune", "rome", "--out", "{blocker}/t"], "cannot create"),
    (["attack", "pgd", "{gpt2}", "--out", "{blocker}/a"], "cannot create"),
    (["rediscover", "zoo:shapesnet", "--out", "{blocker}/r"], "cannot create"),
    # prompts longer than the model's 64 positions, and empty targets
    (["trace", "{gpt2}", "--prompt", LONG, "--subject", "paris", "--out", "{D}/t"], "at most 64 positions"),
    (["neurons", "{gpt2}", "--prompt", LONG.replace("{{}}", "paris"), "--target", "red"], "at most 64 positions"),
    (["edit", "rome", "{gpt2}", "--subject", "paris", "--prompt", LONG, "--target", "rome"], "at most 64 positions"),
    (["edit", "rome", "{gpt2}", "--subject", "paris", "--prompt", LONG, "--target", "rome", "--target-true", "red"],
     "at most 64 positions"),
    ([*NEURONS[:-1], ""], "empty"),
    ([*NEURONS[:-1], "  "], "empty"),
    # numbers: NaN, infinities, zero, negative, huge
    ([*TRACE, "--noise", "nan"], "finite"),
    ([*TRACE, "--samples", "0"], "--samples"),
    ([*TRACE, "--samples", "100000000000"], "noise draws"),
    ([*TRACE, "--batch-size", "0"], "--batch-size"),
    ([*NEURONS, "--threshold", "inf"], "finite"),
    ([*NEURONS, "--share", "nan"], "finite"),
    ([*NEURONS, "--steps", "100000000000"], "integration steps"),
    ([*NEURONS, "--batch-size", "0"], "--batch-size"),
    ([*NEURONS, "--top", "-3"], "--top"),
    ([*EDIT, "--set", "v_lr=nan"], "finite"),
    ([*EDIT, "--set", "kl_factor=-inf"], "finite"),
    ([*EDIT, "--set", "v_lr=1/0"], "b != 0"),
    ([*EDIT, "--batch-size", "0"], "--batch-size"),
    ([*EDIT, "--mom2-samples", "100000000000"], "mom2_n_samples"),
    ([*EDIT, "--set", "mom2_n_samples=100000000000"], "mom2_n_samples"),
    (["ablate", "{gpt2}", *SITE, "--units", "1,2", "--factor", "nan"], "finite"),
    (["ablate", "{gpt2}", *SITE, "--units", "1,2", "--factor", "inf"], "finite"),
    (["ablate", "{gpt2}", "--trojan", "patch-universal", "--n-eval", "0"], "--n-eval"),
    (["steer", "{gpt2}", *RESID, "--strength", "nan"], "finite"),
    (["steer", "{gpt2}", *RESID, "--n", "100000000"], "template sentences"),
    (["erase", "{gpt2}", *RESID, "--n", "100000000"], "template sentences"),
    (["units", "{gpt2}", *SITE, "--concept", "sentiment", "--n", "100000000"], "template sentences"),
    (["units", "{gpt2}", *SITE, "--concept", "sentiment", "--quantile", "nan"], "finite"),
    (["units", "{gpt2}", *SITE, "--concept", "sentiment", "--k", "0"], "--k"),
    (["units", "{gpt2}", *SITE, "--concept", "sentiment", "--threads", "0"], "--threads"),
    (["rewrite", "{gpt2}", "--rank", "0"], "--rank"),
    (["world", "export", "factworld", "--n", "0", "--out", "{D}/x.json"], "--n"),
    (["world", "export", "factworld", "--n", "3", "--seed", "-1", "--out", "{D}/x.json"], "seed"),
    (["reproduce", "1", "--seeds", "0", "--out", "{D}/r"], "--seeds"),
    (["reproduce", "1", "--seeds", "100000000", "--out", "{D}/r"], "--seeds"),
    (["demo", "--threads", "0", "--out", "{D}/d"], "--threads"),
    (["tune", "rome", "--trials", "0", "--out", "{D}/t"], "--trials"),
    (["tune", "rome", "--timeout", "nan", "--out", "{D}/t"], "finite"),
    (["tune", "rome", "--max-ns-loss", "inf", "--out", "{D}/t"], "finite"),
    (["tune", "rome", "--worker", "99999999999", "--out", "{D}/t"], "--worker"),
    (["tune", "ablate", "--set", "n_eval=100000000000", "--out", "{D}/t"], "n_eval"),
    (["tune", "rome", "--constraint", "NS_loss<=nan", "--out", "{D}/t"], "constraint"),
    (["ablate", "{gpt2}", *SITE, "--units", "1,2", "--factor", "1e300"], "infinite entries"),
    (["ablate", "{gpt2}", *SITE, "--units=--"], "--units"),
    ([*TRACE, "--noise=--"], "--noise"),
    (["attack", "pgd", "{gpt2}", "--n", "0", "--out", "{D}/a"], "--n"),
    (["attack", "pgd", "{gpt2}", "--set", "eps=nan", "--out", "{D}/a"], "finite"),
    (["rediscover", "zoo:shapesnet", "--seed", "-1", "--out", "{D}/r"], "seed"),
    # lists
    ([*NEURONS, "--layers", "0-x"], "--layers"),
    ([*NEURONS, "--layers", "7"], "out of range"),
    ([*TRACE, "--kinds", ",,"], "trace kind"),
    ([*TRACE, "--kinds", "mlp,mlp"], "repeat"),
    (["ablate", "{gpt2}", *SITE, "--units", "1,x"], "comma-separated"),
    (["ablate", "{gpt2}", *SITE, "--units", ","], "empty"),
    (["ablate", "{gpt2}", *SITE, "--units", "1,2", "--values", "nan,1"], "finite"),
    (["steer", "{gpt2}", *RESID, "--n", "8", "--strengths=1,inf"], "finite"),
    (["steer", "{gpt2}", *RESID, "--n", "8", "--strengths=,"], "finite"),
    ([*EDIT, "--set", "n_prefixes=a,b"], "n_prefixes"),
    # JSON files and other inputs
    (["erase", "{gpt2}", *RESID, "--data", "{D}/d.json"], "3 texts and 2 labels"),
    ([*EDIT[:3], "--records", "{D}/r.json"], "record"),
    (["rediscover", "zoo:shapesnet", "--trojans", "{D}/t.json", "--train", "--out", "{D}/r"], "not a class"),
    (["reproduce", "os:path", "--out", "{D}/r"], "not a CaseStudy"),
    (["tune", "rome", "--storage", "bogus://x", "--out", "{D}/t"], "storage"),
    (["zoo", "train", "nosuch", "--cache", "{D}/cache"], "zoo has"),
    (["zoo", "train", "shapesnet", "--seed", "-5", "--cache", "{D}/cache"], "seed"),
    (["erase", "{gpt2}", *RESID, "--data", "{D}/labels.json"], "integer classes"),
    (["tune", "rome", "--out", "{D}/other"], "not a `workbench tune` run"),
    (["reproduce", "1", "--out", "{D}/other"], "not a `workbench reproduce` run"),
    # model specs
    (["sites", "zoo:nonexistent"], "zoo has"),
    (["sites", "{D}/no-such-folder"], "valid specs"),
    (["sites", "{gpt2}", "--device", "tpu"], "unknown device"),
    (["zoo", "list", "--cache", "{blocker}/c"], "cannot be created"),
    (["trace", "{notok}", "--prompt", "{{}} is in", "--subject", "paris", "--out", "{D}/t"], "tokenizer.json"),
    ([*EDIT[:2], "{notok}", *EDIT[3:]], "tokenizer.json"),
]

TABLE_FILES: dict[str, str] = {
    "d.json": json.dumps({"texts": ["the cat", "the dog", "a fox"], "labels": [0, 1]}),
    "r.json": json.dumps([{"case_id": 0, "requested_rewrite": {"prompt": "{} is in"}}]),
    "t.json": json.dumps({"trojans": [{"name": "t1", "kind": "patch", "target": "nonexistent",
                                       "trigger": "patch-checker"}]}),
    "other/notes.txt": "someone else's folder\n",
    "labels.json": json.dumps({"texts": ["the cat", "the dog", "a fox", "one red"], "labels": [0, 1, 1.5, 0]}),
}


@pytest.fixture(scope="module")
def models(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, blocker: Path) -> dict[str, str]:
    """Tiny model folders, one without tokenizer files, and the blocking file, by name for `{name}`."""
    from tests.conftest import build_tiny

    model, _ = build_tiny("gpt2")
    notok = tmp_path_factory.mktemp("no-tokenizer") / "gpt2"
    model.save_pretrained(notok, safe_serialization=True)
    return {**{k: str(v) for k, v in tiny_model_dirs.items()}, "notok": str(notok), "blocker": str(blocker)}


@pytest.mark.parametrize("argv, fragment", TABLE, ids=[" ".join(a)[:70] for a, _ in TABLE])
def test_table_of_bad_inputs(argv: list[str], fragment: str, models: dict[str, str],
                             capsys: pytest.CaptureFixture[str]) -> None:
    device = [] if "--device" in argv else ["--device", "cpu"]
    line = refused(capsys, [*argv, *device], files=TABLE_FILES, **models)
    assert fragment in line, line


# --- Hypothesis: many more values of each kind ---------------------------------------------------

def _not_finite(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return True


BAD_FLOATS = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e400", "", "1,2", "0x10", "one"]),
    st.text(max_size=8).filter(lambda t: "\x00" not in t and _not_finite(t)),
)
FLOAT_FLAGS = [
    ([*TRACE], "--noise"),
    ([*NEURONS], "--threshold"),
    ([*NEURONS], "--share"),
    (["ablate", "{gpt2}", *SITE, "--units", "1"], "--factor"),
    (["ablate", "{gpt2}", "--trojan", "t", "--method", "mask"], "--mask-max-gate"),
    (["steer", "{gpt2}", *RESID], "--strength"),
    (["units", "{gpt2}", *SITE], "--quantile"),
    (["tune", "rome", "--out", "{D}/t"], "--timeout"),
    (["tune", "rome", "--out", "{D}/t"], "--max-ns-loss"),
]


@FUZZ
@given(case=st.sampled_from(FLOAT_FLAGS), value=BAD_FLOATS)
def test_float_flags_refuse_non_finite_values(case: tuple[list[str], str], value: str, models: dict[str, str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    argv, flag = case
    line = refused(capsys, argv, extra=(f"{flag}={value}",), **models)
    assert flag in line, line


COUNT_FLAGS = [
    ([*TRACE], "--samples"), ([*TRACE], "--window"), ([*TRACE], "--batch-size"),
    ([*NEURONS], "--steps"), ([*NEURONS], "--top"), ([*NEURONS], "--batch-size"),
    ([*EDIT], "--batch-size"), ([*EDIT], "--mom2-samples"), ([*EDIT], "--n"),
    (["ablate", "{gpt2}", "--trojan", "t"], "--n-eval"), (["ablate", "{gpt2}", "--trojan", "t"], "--draws"),
    (["erase", "{gpt2}", *RESID], "--n"), (["steer", "{gpt2}", *RESID], "--threads"),
    (["units", "{gpt2}", *SITE], "--k"), (["rewrite", "{gpt2}"], "--rank"),
    (["reproduce", "1", "--out", "{D}/r"], "--seeds"), (["demo", "--out", "{D}/d"], "--threads"),
    (["tune", "rome", "--out", "{D}/t"], "--trials"), (["attack", "pgd", "{gpt2}", "--out", "{D}/a"], "--n"),
]
NOT_COUNTS = st.one_of(st.integers(max_value=0).map(str), st.sampled_from(["1.5", "1e8", "ten", "", "0x10", "nan"]))


@FUZZ
@given(case=st.sampled_from(COUNT_FLAGS), value=NOT_COUNTS)
def test_count_flags_refuse_zero_negative_and_non_integers(case: tuple[list[str], str], value: str,
                                                          models: dict[str, str],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    argv, flag = case
    line = refused(capsys, argv, extra=(f"{flag}={value}", "--device", "cpu"), **models)
    assert flag in line, line


BOUNDED_FLAGS = [
    ([*TRACE], "--seed"), ([*EDIT], "--seed"), (["world", "render", "shapesworld", "--out", "{D}/w.png"], "--seed"),
    (["rediscover", "zoo:shapesnet", "--out", "{D}/r"], "--seed"), (["steer", "{gpt2}", *RESID], "--threads"),
    (["reproduce", "1", "--out", "{D}/r"], "--seeds"), (["tune", "rome", "--out", "{D}/t"], "--worker"),
    (["reproduce", "1", "--out", "{D}/r"], "--threads"),
]
OUT_OF_BOUNDS = st.one_of(st.integers(max_value=-1), st.integers(min_value=2**31)).map(str)


@FUZZ
@given(case=st.sampled_from(BOUNDED_FLAGS), value=OUT_OF_BOUNDS)
def test_seeds_and_bounded_counts_refuse_negative_and_huge(case: tuple[list[str], str], value: str,
                                                           models: dict[str, str],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    argv, flag = case
    line = refused(capsys, argv, extra=(f"{flag}={value}", "--device", "cpu"), **models)
    assert flag in line, line


CORE_CAPS = [
    ([*TRACE], "--samples"),
    ([*NEURONS], "--steps"),
    ([*EDIT], "--mom2-samples"),
    (["erase", "{gpt2}", *RESID, "--out", "{D}/e"], "--n"),
    (["steer", "{gpt2}", *RESID, "--out", "{D}/s"], "--n"),
    (["units", "{gpt2}", *SITE, "--concept", "topic"], "--n"),
]


@FUZZ
@given(case=st.sampled_from(CORE_CAPS), value=st.integers(min_value=10**8, max_value=10**15).map(str))
def test_huge_counts_are_refused_before_allocating(case: tuple[list[str], str], value: str, models: dict[str, str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    argv, flag = case
    line = refused(capsys, argv, extra=(flag, value, "--device", "cpu"), **models)
    assert value in line, line


LISTS = {  # flag: (command, items that are fine, items that are not)
    "--layers": ([*NEURONS], ["0", "1"], ["x", "1.5", "nan", "--", "9999", "1e3", "0x1", "+-", "2"]),
    "--units": (["ablate", "{gpt2}", *SITE], ["0", "1"], ["x", "1.5", "nan", "--", "9999", "1e3", "0x1", "-"]),
    "--strengths": (["steer", "{gpt2}", *RESID, "--n", "8"], ["0", "-1.5", "2e0"],
                    ["x", "nan", "inf", "-inf", "--", "+-", "0x1", "1e999", "1..2"]),
    "--kinds": ([*TRACE], ["mlp"], ["x", "MLP", "0", "attn,attn", "resid"]),
    "--values": (["ablate", "{gpt2}", *SITE, "--units", "0"], [], ["x", "nan", "inf", "1e999", "--"]),
}


@st.composite
def bad_lists(draw: st.DrawFn) -> tuple[str, list[str], str]:
    flag = draw(st.sampled_from(sorted(LISTS)))
    argv, good, bad = LISTS[flag]
    items = draw(st.lists(st.sampled_from(good), max_size=3)) if good else []
    items.insert(draw(st.integers(0, len(items))), draw(st.sampled_from(bad)))
    return flag, argv, ",".join(items)


@FUZZ
@given(case=bad_lists())
def test_malformed_lists_are_refused(case: tuple[str, list[str], str], models: dict[str, str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    flag, argv, value = case
    refused(capsys, argv, extra=(f"{flag}={value}", "--device", "cpu"), **models)


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=6))
ANY_JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=8)
BAD_LABEL = st.one_of(st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)),
                      st.text(max_size=3), st.none(), st.booleans(), st.integers(max_value=-1), st.lists(st.integers()))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@st.composite
def bad_concept_data(draw: st.DrawFn) -> str:
    """A --data file that is not JSON, not the right shape, has a bad label, or mismatched counts."""
    kind = draw(st.sampled_from(["garbage", "any", "label", "counts", "other"]))
    texts = draw(st.lists(st.sampled_from(["the cat", "the dog", "a fox", "one red"]), min_size=4, max_size=8))
    labels: list[object] = [i % 2 for i in range(len(texts))]
    if kind == "garbage":
        return draw(st.text(max_size=20).filter(lambda t: not _is_json(t)))
    if kind == "any":
        return json.dumps(draw(ANY_JSON))
    if kind == "label":
        labels[draw(st.integers(0, len(labels) - 1))] = draw(BAD_LABEL)
        return json.dumps({"texts": texts, "labels": labels})
    if kind == "counts":
        return json.dumps({"texts": texts, "labels": labels[: draw(st.integers(0, len(texts) - 1))]})
    return json.dumps({"texts": texts, "labels": labels, "other_labels": [*labels, 0]})


@FUZZ
@given(content=bad_concept_data(), command=st.sampled_from(["erase", "steer", "units"]))
def test_malformed_concept_data_files(content: str, command: str, models: dict[str, str],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    site = SITE if command == "units" else RESID
    refused(capsys, [command, "{gpt2}", *site, "--data", "{D}/data.json", "--device", "cpu"],
            files={"data.json": content}, **models)


@FUZZ
@given(content=st.one_of(ANY_JSON.map(json.dumps), st.text(max_size=30)),
       command=st.sampled_from(["records", "trojans"]))
def test_malformed_records_and_trojan_files(content: str, command: str, models: dict[str, str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    argv = {"records": [*EDIT[:3], "--records", "{D}/f.json"],
            "trojans": ["rediscover", "zoo:shapesnet", "--trojans", "{D}/f.json", "--train", "--out", "{D}/r"]}[command]
    refused(capsys, [*argv, "--device", "cpu"], files={"f.json": content}, **models)


@FUZZ
@given(content=st.binary(max_size=64))
def test_malformed_attack_inputs(content: bytes, models: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["attack", "pgd", "{gpt2}", "--inputs", "{D}/x.safetensors", "--out", "{D}/a", "--device", "cpu"],
            files={"x.safetensors": content}, **models)


SPECS = st.one_of(
    st.from_regex(r"zoo:[a-z0-9_-]{1,10}", fullmatch=True).filter(
        lambda s: s.split(":")[1] not in {"factgpt", "factgpt-large", "shapesnet"}),
    st.from_regex(r"zoo:(factgpt|shapesnet)@[a-z-]{1,6}", fullmatch=True),
    st.from_regex(r"[a-z]{1,8}(/[a-z]{1,8})?", fullmatch=True).map(lambda p: "{D}/" + p),
    st.sampled_from(["{D}/empty", "{D}/garbage", "{D}/cfg", "{blocker}"]),
)
SPEC_FILES: dict[str, str | bytes] = {"empty/.keep": "", "garbage/config.json": "{not json", "cfg/config.json": "{}"}


@FUZZ
@given(spec=SPECS, command=st.sampled_from(["sites", "trace", "neurons", "edit", "units"]))
def test_model_specs_that_name_nothing(spec: str, command: str, models: dict[str, str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    argv = {"sites": ["sites", spec],
            "trace": ["trace", spec, "--prompt", "{{}} is in", "--subject", "paris", "--out", "{D}/t"],
            "neurons": ["neurons", spec, "--prompt", "paris is in", "--target", "red"],
            "edit": ["edit", "rome", spec, "--subject", "paris", "--prompt", "{{}} is in", "--target", "rome"],
            "units": ["units", spec, *SITE, "--concept", "sentiment", "--n", "8"]}[command]
    refused(capsys, [*argv, "--device", "cpu"], files=SPEC_FILES, **models)


@FUZZ
@given(value=st.sampled_from(["nan", "inf", "-inf", "1/0", "0/0", "1e999", "x", ""]),
       field=st.sampled_from(["v_lr", "kl_factor", "clamp_norm_factor", "v_weight_decay", "min_denominator"]))
def test_editor_settings_refuse_non_finite(value: str, field: str, models: dict[str, str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(capsys, EDIT, extra=("--set", f"{field}={value}", "--device", "cpu"), **models)
    assert field in line, line
