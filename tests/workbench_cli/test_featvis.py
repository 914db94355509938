"""`workbench featvis` and `workbench rediscover`: files written, JSON contract, one-line errors."""

from __future__ import annotations

import json

import pytest

from workbench_cli.main import main


def _run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_featvis_writes_images_and_json(tmp_path, capsys):
    out = tmp_path / "fv"
    code, stdout, _ = _run(capsys, ["featvis", "zoo:shapesnet", "--site", "layer2", "--unit", "3", "--steps", "12",
                                    "--snapshots", "0,6", "--out", str(out), "--json", "--device", "cpu"])
    assert code == 0
    doc = json.loads(stdout)
    assert doc["status"] == "completed" and doc["shape"] == [1, 3, 48, 48] and doc["snapshot_steps"] == [0, 6]
    for name in ("grid.png", "snapshots.png", "images.safetensors", "featvis.json"):
        assert (out / name).is_file()


def test_featvis_logit_with_scene_param(tmp_path, capsys):
    code, stdout, _ = _run(capsys, ["featvis", "zoo:shapesnet", "--logit", "star", "--param", "scene", "--steps", "6",
                                    "--batch", "2", "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert code == 0 and "scene 0:" in stdout and "scene 1:" in stdout


@pytest.mark.parametrize("argv, message", [
    (["--site", "layer9", "--unit", "0"], "unknown site"),
    (["--site", "layer2", "--unit", "99"], "out of range"),
    (["--logit", "dragon"], "unknown class"),
    (["--site", "layer2"], "give --site and --unit"),
    (["--site", "layer2", "--unit", "0", "--param", "voxels"], "unknown parameterization"),
])
def test_featvis_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    code, stdout, stderr = _run(capsys, ["featvis", "zoo:shapesnet", *argv, "--steps", "2", "--out", str(tmp_path / "e"),
                                         "--device", "cpu"])
    assert code == 2 and stdout == ""
    assert message in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("snapshots", ["a,b", "0,x", "1.5", "-3"])
def test_featvis_bad_snapshots_exit_2_with_one_line_and_no_files(tmp_path, capsys, snapshots):
    out = tmp_path / "fv"
    code, stdout, stderr = _run(capsys, ["featvis", "zoo:shapesnet", "--site", "layer2", "--unit", "3", "--steps", "4",
                                         f"--snapshots={snapshots}", "--out", str(out), "--device", "cpu"])
    assert code == 2 and stdout == ""
    assert "--snapshots" in stderr and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not out.exists()


def test_featvis_init_noise_reaches_the_parameterization(tmp_path, capsys):
    out = tmp_path / "fv"
    code, stdout, _ = _run(capsys, ["featvis", "zoo:shapesnet", "--site", "layer2", "--unit", "3", "--steps", "4",
                                    "--init-noise", "0.7", "--out", str(out), "--json", "--device", "cpu"])
    assert code == 0
    doc = json.loads(stdout)
    assert doc["init_noise"] == 0.7 and doc["restarts"] == 0
    assert json.loads((out / "featvis.json").read_text())["init_noise"] == 0.7
    for argv, message in ((["--init-noise", "-1"], "init noise"), (["--param", "scene", "--init-noise", "0.5"], "no start noise")):
        code, stdout, stderr = _run(capsys, ["featvis", "zoo:shapesnet", "--site", "layer2", "--unit", "3", *argv,
                                             "--steps", "2", "--out", str(tmp_path / "e"), "--device", "cpu"])
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
        assert not (tmp_path / "e").exists()


def test_featvis_unit_that_never_fires_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from tests.workbench.test_featvis import EdgeNet
    from workbench.handle import Architecture, ImagePreprocess, ModelHandle
    from workbench_cli import featvis as cli

    pre = ImagePreprocess(height=12, width=12, channels=1, mean=(0.0,), std=(1.0,), class_names=("a", "b"))
    handle = ModelHandle(spec="test:edge-net", model=EdgeNet().eval(), kind="image_classifier",
                         arch=Architecture(family="cnn", n_layers=1), preprocess=pre)
    monkeypatch.setattr(cli, "_load_image_model", lambda spec, device: handle)
    out = tmp_path / "fv"
    code, stdout, stderr = _run(capsys, ["featvis", "edge", "--site", "relu", "--unit", "1", "--steps", "20",
                                         "--out", str(out), "--json", "--device", "cpu"])
    assert code == 2 and stdout == "" and not out.exists()
    assert "found nothing" in stderr and "no start gave" in stderr and len(stderr.strip().splitlines()) == 1
    code, stdout, _ = _run(capsys, ["featvis", "edge", "--site", "relu", "--unit", "0", "--steps", "20",
                                    "--out", str(out), "--json", "--device", "cpu"])
    doc = json.loads(stdout)
    assert code == 0 and doc["status"] == "completed" and doc["activation"][0] > 0


def test_rediscover_bad_config(tmp_path, capsys):
    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps({"trojans": [{"name": "x", "kind": "natural", "target": "ring", "trigger": "natural-arrow"}]}))
    code, _, stderr = _run(capsys, ["rediscover", "zoo:shapesnet", "--trojans", str(cfg), "--methods", "featvis-logit",
                                    "--budget", "tiny", "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert code == 2 and "not implanted" in stderr
    code, _, stderr = _run(capsys, ["rediscover", "zoo:shapesnet", "--methods", "nope", "--out", str(tmp_path / "r"),
                                    "--device", "cpu"])
    assert code == 2 and "unknown rediscovery methods" in stderr


@pytest.mark.slow
def test_rediscover_json_contract(tmp_path, capsys):
    cfg = tmp_path / "t.json"
    cfg.write_text(json.dumps({"trojans": [
        {"name": "natural-universal", "kind": "natural", "target": "diamond", "trigger": "natural-heart", "poison_fraction": 0.08},
    ]}))
    code, stdout, _ = _run(capsys, ["rediscover", "zoo:shapesnet", "--trojans", str(cfg), "--methods", "featvis-logit",
                                    "--budget", "tiny", "--out", str(tmp_path / "r"), "--json", "--device", "cpu"])
    assert code == 0
    doc = json.loads(stdout)
    assert 0.0 <= doc["mean_score"] <= 1.0
    assert doc["per_trojan"] == [{**doc["per_trojan"][0], "name": "natural-universal", "kind": "natural",
                                  "method": "featvis-logit"}]
    assert (tmp_path / "r" / "rediscovery.txt").is_file() and (tmp_path / "r" / "views" / "views.safetensors").is_file()
