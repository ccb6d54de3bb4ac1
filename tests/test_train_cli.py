"""``fxprune train``: end to end, resume, and damaged checkpoints (tiny settings, CPU)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fxprune.io
from fxprune.cli import main
from fxprune.errors import CheckpointError
from fxprune.train import LAST, PREV, load_checkpoint, resume_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "fxprune.models:tiny_resnet", "--train-subset", "96", "--test-subset", "48",
        "--batch-size", "32", "--image-size", "12", "--lr", "0.05", "--start-pruning-epoch", "0.34",
        "--pruning-epochs", "1.33", "--lr-decay-epochs", "1.5", "--no-progress"]


def run(out, *extra):
    return main(["train", *TINY, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted two-epoch run."""
    out = tmp_path_factory.mktemp("straight")
    assert run(out, "--epochs", "2") == 0
    return out


def report_of(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def final_state(out):
    return load_checkpoint(os.path.join(out, "checkpoints", LAST))


def assert_same_run(a, b):
    """Bit-identical final model, optimizer and random states, and equal reported results."""
    sa, sb = final_state(a), final_state(b)
    assert sa["epoch"] == sb["epoch"]
    for part in ("model", "optimizer", "rng"):
        assert_equal_nested(sa[part], sb[part], part)
    ra, rb = report_of(a), report_of(b)
    for key in ("accuracy", "max_abs_output_diff", "params", "flops", "group_sparsity"):
        assert ra[key] == rb[key], key
    drop = lambda h: [{k: v for k, v in e.items() if "seconds" not in k} for e in h]  # noqa: E731
    assert drop(ra["history"]) == drop(rb["history"])


def assert_equal_nested(x, y, where):
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert list(x) == list(y), where
        for k in x:
            assert_equal_nested(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_equal_nested(u, v, f"{where}[{i}]")
    else:
        assert x == y, where


def test_end_to_end(straight):
    rep = report_of(straight)
    assert rep["accuracy"]["full"] == rep["accuracy"]["slim"]
    assert rep["accuracy"]["equal"] is True
    assert rep["max_abs_output_diff"] < 1e-4
    # DHSPG meets its target exactly: floor(0.5 * C) channels are zero.
    assert rep["zero_channels"] == rep["prunable_channels"] // 2
    assert rep["flops"]["slim"] < rep["flops"]["full"]
    assert rep["params"]["slim"] < rep["params"]["full"]
    assert [h["epoch"] for h in rep["history"]] == [1, 2]
    assert rep["config"]["target_group_sparsity"] == 0.5
    assert rep["wall_time_s"]["train"] > 0
    assert rep["fused_optimizer_kernels"] is True  # the default on the CPU
    ckpts = os.path.join(straight, "checkpoints")
    assert sorted(os.listdir(ckpts)) == [LAST, PREV]  # no temporary files left behind
    assert load_checkpoint(os.path.join(ckpts, PREV))["epoch"] == 1
    slim = fxprune.io.load(os.path.join(straight, "slim"))
    x = torch.rand(3, 3, 12, 12)
    assert slim(x).shape == (3, 10)


def test_module_entry_point(tmp_path):
    """``python -m fxprune train`` is the same command."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fxprune", "train", *TINY, "--epochs", "1",
                           "--target-group-sparsity", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout
    rep = report_of(tmp_path)
    assert rep["group_sparsity"] == 0.0
    assert rep["flops"]["slim"] == rep["flops"]["full"]


def test_resume_is_bit_identical(straight, tmp_path):
    assert run(tmp_path, "--epochs", "1") == 0
    assert final_state(tmp_path)["epoch"] == 1
    assert main(["train", "--out", str(tmp_path), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert_same_run(straight, tmp_path)


def test_resume_refuses_changed_settings(straight, tmp_path, capsys):
    shutil.copytree(straight, tmp_path / "run")
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--lr", "0.5"]) == 1
    assert "lr" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint(straight, tmp_path, damage, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    last = out / "checkpoints" / LAST
    blob = last.read_bytes()
    if damage == "truncate":
        last.write_bytes(blob[: len(blob) // 2])
    else:  # one flipped bit inside the stored tensors
        i = len(blob) // 2
        last.write_bytes(blob[:i] + bytes([blob[i] ^ 0x10]) + blob[i + 1:])
    with pytest.raises(CheckpointError, match=r"(truncated|corrupt).*prev\.pt"):
        load_checkpoint(str(last))
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "cannot be read" in err or "corrupt" in err
    assert "--resume " + str(out / "checkpoints" / PREV) in err
    # The previous checkpoint (end of epoch 1) is intact and finishes the run as if nothing
    # had happened.
    prev = out / "checkpoints" / PREV
    assert load_checkpoint(str(prev))["epoch"] == 1
    assert main(["train", "--resume", str(prev), "--epochs", "2", "--no-progress"]) == 0
    assert_same_run(straight, out)


def test_missing_last_falls_back_to_previous(straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    os.remove(out / "checkpoints" / LAST)  # as if a crash fell between the two renames
    assert resume_path(str(out)) == str(out / "checkpoints" / PREV)
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--no-progress"]) == 0
    assert_same_run(straight, out)


def test_image_folder_dataset(tmp_path):
    """``--dataset PATH`` reads an ImageFolder tree and splits it 80/20 by class."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c, name in enumerate(["circle", "square"]):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(10):
            pixels = (torch.rand(20, 20, 3, generator=gen) * 100 + 120 * c).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(tmp_path / "data" / name / f"{i}.png")
    out = tmp_path / "run"
    assert main(["train", "--model", "fxprune.models:tiny_resnet", "--dataset",
                 str(tmp_path / "data"), "--image-size", "12", "--batch-size", "8", "--epochs", "1",
                 "--start-pruning-epoch", "0", "--pruning-epochs", "1", "--out", str(out),
                 "--no-progress"]) == 0
    rep = report_of(out)
    assert rep["test_examples"] == 4
    assert rep["accuracy"]["full"] == rep["accuracy"]["slim"]


@pytest.fixture(scope="module")
def ato_run(tmp_path_factory):
    """A two-epoch Auto-Train-Once run at 60% of the full model's FLOPs."""
    out = tmp_path_factory.mktemp("ato")
    assert run(out, "--epochs", "2", "--method", "ato", "--target-flops", "0.6") == 0
    return out


def test_ato_end_to_end(ato_run):
    rep = report_of(ato_run)
    assert rep["config"]["method"] == "ato"
    assert rep["accuracy"]["equal"] is True and rep["max_abs_output_diff"] < 1e-4
    ratio = rep["flops"]["slim"] / rep["flops"]["full"]
    assert abs(ratio - 0.6) <= 0.02, ratio  # fxprune.report's FLOPs, not the controller's model
    assert rep["ato"]["frozen"] and rep["ato"]["controller_steps"] > 0
    assert rep["zero_channels"] == rep["prunable_channels"] - rep["ato"]["kept_channels"]
    assert "ato" in final_state(ato_run)


def test_ato_resume_after_crash_is_bit_identical(ato_run, tmp_path):
    """A run that died after epoch 1 (only its epoch-1 checkpoint left) resumes to the same
    final state as the uninterrupted run, controller included."""
    shutil.copytree(ato_run, tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    os.replace(ckpts / PREV, ckpts / LAST)
    os.remove(tmp_path / "run" / "report.json")
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--no-progress"]) == 0
    assert_same_run(ato_run, tmp_path / "run")
    assert_equal_nested(final_state(ato_run)["ato"], final_state(tmp_path / "run")["ato"], "ato")


def test_ato_refuses_changed_epochs_and_erase_mode(ato_run, tmp_path, capsys):
    shutil.copytree(ato_run, tmp_path / "run")
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--epochs", "3"]) == 1
    assert "schedule" in capsys.readouterr().err
    assert run(tmp_path / "erase", "--method", "ato", "--mode", "erase") == 1
    assert "erase" in capsys.readouterr().err
