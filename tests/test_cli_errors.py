"""The CLI's error rule (one line and exit 2 for bad input, a traceback for bugs, 130 for Ctrl-C),
``mstok sample``'s argument checks, missing-weights hints that name flags, and default outputs
that never land in the current folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mstok
from mstok import cli
from mstok.cli_errors import is_user_error, one_line, run_command
from mstok.cli_generation import parse_classes


def _raise(err: BaseException):
    def command(args: argparse.Namespace) -> int:
        raise err

    return command


def _namespace(command: str = "eval") -> argparse.Namespace:
    return argparse.Namespace(command=command)


# ------------------------------------------------------------------ the rule
def test_bad_input_errors_are_one_line_with_exit_code_2(capsys) -> None:
    code = run_command(_raise(FileNotFoundError("no such folder /data/x")), _namespace())
    assert code == 2
    assert capsys.readouterr().err == "mstok eval: error: no such folder /data/x\n"


def test_multi_line_messages_become_one_line(capsys) -> None:
    run_command(
        _raise(ValueError("first\n  To fix: second\n")), argparse.Namespace(command="data", data_command="to-shards")
    )
    assert capsys.readouterr().err == "mstok data to-shards: error: first To fix: second\n"


def test_a_bug_keeps_its_traceback() -> None:
    with pytest.raises(AttributeError):
        run_command(_raise(AttributeError("'NoneType' object has no attribute 'x'")), _namespace())


def test_type_and_runtime_errors_are_user_errors_only_when_mstok_raises_them() -> None:
    with pytest.raises(TypeError) as raised:
        mstok.TiTok(5)  # mstok's own check: "TiTok needs a TiTokConfig"
    assert is_user_error(raised.value)
    with pytest.raises(TypeError) as raised:
        torch.zeros(2) + "a"  # a TypeError from inside torch: a bug, keep the traceback
    assert not is_user_error(raised.value)
    with pytest.raises(RuntimeError) as raised:
        torch.zeros(2) @ torch.zeros(3)
    assert not is_user_error(raised.value)


def test_device_error_raised_by_mstok_is_one_line(monkeypatch, capsys) -> None:
    from mstok.training.distributed import DistContext

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_command(lambda args: DistContext.from_env("cuda"), _namespace("pretokenize")) == 2
    err = capsys.readouterr().err
    expected = "device = 'cuda', but CUDA is not available on this machine: use 'auto' or 'cpu'"
    assert err == f"mstok pretokenize: error: {expected}\n"


def test_a_wrong_checkpoint_path_is_one_line_before_any_network_loads(tmp_path, monkeypatch, capsys) -> None:
    from mstok.evaluation import evaluate

    monkeypatch.setattr(evaluate, "load_metric_networks", _raise(AssertionError("loaded metric networks first")))
    args = ["eval", "--checkpoint", str(tmp_path / "nope"), "--data", str(tmp_path), "--no-progress"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mstok eval: error: --checkpoint: ") and "nope does not exist" in err
    assert err.count("\n") == 1


def test_ctrl_c_exits_130_with_one_line(capsys) -> None:
    assert run_command(_raise(KeyboardInterrupt()), _namespace("train")) == 130
    err = capsys.readouterr().err
    assert "mstok train: interrupted" in err and "Traceback" not in err


def test_one_line_of_an_empty_message_names_the_type() -> None:
    assert one_line(ValueError()) == "ValueError"


# ------------------------------------------------------------------ mstok sample's arguments
@pytest.mark.parametrize("n", ["0", "-3", "two"])
def test_sample_refuses_a_non_positive_count(n: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["sample", "--generator", "g", "--tokenizer", "t", "--n", n])
    assert exited.value.code == 2
    assert "argument --n" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10", r"--classes 10: this generator has 10 classes, so class ids go from 0 to 9"),
        ("3,-1", r"--classes -1: this generator has 10 classes"),
        ("a,b", r"comma-separated class ids or 'all', got 'a,b'"),
        (",", r"names no class"),
    ],
)
def test_sample_classes_outside_the_range_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_classes(text, 10)


def test_sample_classes_in_range() -> None:
    assert parse_classes("all", 3) == [0, 1, 2]
    assert parse_classes("2, 0", 3) == [2, 0]


# ------------------------------------------------------------------ missing weights name the command's flags
def _image_folder(root: Path, n: int = 4, classes: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """A run folder with one checkpoint of an untrained titok_tiny."""
    step = tmp_path / "run" / "checkpoints" / "step_0000001"
    mstok.create_tokenizer("titok_tiny").save_pretrained(step)
    return tmp_path / "run"


@pytest.mark.slow
def test_eval_hints_name_flags_and_writes_a_labelled_grid_under_the_run(run_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MSTOK_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.chdir(tmp_path)
    data = _image_folder(tmp_path / "imgs")
    args = ["eval", "--checkpoint", str(run_folder), "--data", str(data), "--no-download", "--no-progress"]
    assert cli.main([*args, "--num-workers", "0", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    for flag in ("--vgg-weights", "--inception-weights", "--no-download"):
        assert flag in out
    assert "perceptual.vgg_weights" not in out and "path=..." not in out
    assert "To fix: download it from" in out  # the reason's later lines are kept, not cut to one
    # the default output goes under the run folder, nothing into the current folder
    results = run_folder / "eval" / "step_0000001" / "results.json"
    assert json.loads(results.read_text())["weights"] == "model.safetensors"
    assert {p.name for p in tmp_path.iterdir()} <= {"empty-cache", "imgs", "run"}
    with Image.open(results.parent / "grid.png") as image:
        grid = np.asarray(image.convert("L"))
    # 4 tiles of 64 px with 2 px gaps: a labelled grid is wider, and its label column holds dark text
    assert grid.shape[1] > 4 * 66 + 2
    assert (grid[:, : grid.shape[1] - (4 * 66 + 2)] < 128).any()


@pytest.mark.slow
def test_probe_writes_under_the_run_folder_by_default(run_folder, tmp_path, monkeypatch, capsys) -> None:
    data = _image_folder(tmp_path / "imgs", n=6)
    monkeypatch.chdir(tmp_path)
    args = ["probe", "--checkpoint", str(run_folder), "--train", str(data), "--split", "2,1", "--epochs", "1"]
    assert cli.main([*args, "--batch-size", "4", "--no-progress", "--device", "cpu"]) == 0
    assert not (tmp_path / "probe.json").exists()
    written = run_folder / "probe" / "step_0000001" / "probe.json"
    assert json.loads(written.read_text())["top1"] >= 0
    assert str(written) in capsys.readouterr().out


def test_help_of_every_model_command_states_the_loading_rule(capsys) -> None:
    for command in ("eval", "probe", "pretokenize", "sample"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "ema.safetensors when the checkpoint has it, else model.safetensors" in text, command
        assert "a run folder (its newest checkpoint)" in text, command


# ------------------------------------------------------------------ labelled grids
def test_grid_labels_add_a_text_column_and_must_match_the_rows() -> None:
    from mstok.images import make_grid

    rows = torch.ones(2, 3, 3, 16, 16)  # white images: any dark pixel is label text
    plain, labelled = make_grid(rows), make_grid(rows, labels=("original", "reconstruction"))
    assert labelled.shape[0] == plain.shape[0] and labelled.shape[1] > plain.shape[1]
    column = labelled[:, : labelled.shape[1] - plain.shape[1]]
    assert (column[:18] < 128).any() and (column[18:] < 128).any()  # text in each row's band
    assert np.array_equal(labelled[:, column.shape[1] :], plain)  # the images themselves are unchanged
    with pytest.raises(ValueError, match="1 labels for a grid of 2 rows"):
        make_grid(rows, labels=("original",))
