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
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lr cannot change on --resume" in err


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
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--epochs", "3"]) == 2
    assert "schedule" in capsys.readouterr().err
    assert run(tmp_path / "erase", "--method", "ato", "--mode", "erase") == 2
    assert "erase" in capsys.readouterr().err


def test_unreadable_checkpoint_gives_no_unsafe_advice(tmp_path, recwarn):
    """torch's own message for a file weights_only=True cannot read advises weights_only=False
    (which would run the file's pickled code): fxprune's error says why, without that advice,
    and torch's warning about pickle protocols is not shown."""
    import pickle

    ckpts = tmp_path / "checkpoints"
    from fxprune.train import save_checkpoint

    save_checkpoint({"epoch": 1, "model": {"w": torch.ones(3)}}, str(ckpts))
    blob = (ckpts / LAST).read_bytes()
    for content, why in ((b"", "the file is empty"),
                         (pickle.dumps({"a": 1}, protocol=4), "holds objects other than"),
                         (blob[: len(blob) // 2], "not a complete checkpoint archive")):
        (ckpts / LAST).write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(str(ckpts / LAST))
        message = str(info.value)
        assert why in message and "weights_only" not in message, message
        assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not [w for w in recwarn.list if "pickle" in str(w.message)]


# ---------------------------------------------------------------------------- the command line


def test_help_imports_no_torch():
    """``fxprune train -h`` and ``fxprune export -h`` answer before torch is imported."""
    code = ("import sys\nfrom fxprune.cli import main\n"
            "for cmd in ('train', 'export'):\n"
            "    try:\n        main([cmd, '-h'])\n    except SystemExit as e:\n        assert e.code == 0\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "import fxprune\nassert 'torch' not in sys.modules\nprint('ok')\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.endswith("ok\n"), proc.stderr
    assert "--overwrite" in proc.stdout and "--no-progress" in proc.stdout


def _refuse(monkeypatch, *names):
    """Fail the test if any of ``fxprune.data.load`` / ``fxprune.program.compile`` is called."""
    import fxprune.data
    import fxprune.program

    def refuse(*a, **k):
        raise AssertionError(f"called one of {names} before the flags and data were checked")

    for name in names:
        module, attr = name.rsplit(".", 1)
        monkeypatch.setattr({"data": fxprune.data, "program": fxprune.program}[module], attr, refuse)


@pytest.fixture
def nothing_loaded(monkeypatch):
    _refuse(monkeypatch, "data.load", "program.compile")


@pytest.mark.parametrize("args, message", [
    (["--image-size", "0"], "--image-size must be an integer in [1, 4096], not 0"),
    (["--target-group-sparsity", "1"], "--target-group-sparsity must be in [0, 1), not 1.0"),
    (["--epochs", "0"], "--epochs must be an integer of at least 1, not 0"),
    (["--batch-size", "-2"], "--batch-size must be an integer of at least 1"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--lr-decay-epochs", "3,-1"], "--lr-decay-epochs must be epochs of at least 0"),
    (["--pruning-epochs", "0"], "--pruning-epochs must be positive"),
    (["--method", "ato", "--target-flops", "1.2"], "--target-flops must be in (0, 1)"),
    (["--method", "ato", "--mode", "erase"], "--method ato prunes channels"),
    (["--train-subset", "0"], "--train-subset must be an integer of at least 1"),
    (["--num-workers", "-1"], "--num-workers must be an integer of at least 0"),
    (["--dataset", "/no/such/folder"], "--dataset must be 'digits' or an ImageFolder directory"),
    (["--model", "resnet18:"], "--model must be a torchvision model name or module:factory"),
    (["--model", "no_such_net"], "--model must be a torchvision classification model name"),
    (["--model", "fxprune.models:no_such_factory"], "--model fxprune.models:no_such_factory: fxprune.models has no"),
    (["--device", "warp9"], "--device must be a torch device"),
    (["--resume", "--overwrite"], "give one of them"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
])
def test_bad_flags_are_named_before_anything_loads(nothing_loaded, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) if "invalid int" in message else _no_raise() as info:
        code = main(["train", "--out", str(tmp_path / "run"), *args])
    code = info.value.code if isinstance(info, pytest.ExceptionInfo) else code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _images(folder, n, size=12):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(size, size, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")


@pytest.fixture
def no_compile(monkeypatch):
    _refuse(monkeypatch, "program.compile")


@pytest.mark.parametrize("case", ["empty folder", "one class", "garbage image", "truncated jpeg"])
def test_unusable_datasets_are_named_before_training(no_compile, tmp_path, capsys, case):
    data = tmp_path / "data"
    data.mkdir()
    bad = None
    if case != "empty folder":
        _images(data / "cat", 6)
    if case in ("garbage image", "truncated jpeg"):
        _images(data / "dog", 6)
        if case == "garbage image":
            bad = data / "dog" / "x.png"
            bad.write_bytes(b"this is not an image")
        else:
            from PIL import Image

            bad = data / "dog" / "y.jpg"
            Image.new("RGB", (64, 64), (200, 30, 30)).save(bad, quality=95)
            bad.write_bytes(bad.read_bytes()[:300])
    code = main(["train", "--dataset", str(data), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    expected = {"empty folder": "holds no images in class folders", "one class": "has one class ('cat')"}
    assert (expected[case] if bad is None else f"image {bad} cannot be read") in err, err


def test_a_fresh_run_refuses_an_output_that_holds_a_run(straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    stamp = (out / "checkpoints" / LAST).stat().st_mtime_ns
    assert run(out, "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a run (checkpoints/last.pt" in err and "--overwrite" in err
    assert (out / "checkpoints" / LAST).stat().st_mtime_ns == stamp  # nothing was touched
    assert run(out, "--epochs", "1", "--overwrite") == 0
    assert report_of(out)["history"][-1]["epoch"] == 1
    assert sorted(os.listdir(out / "checkpoints")) == [LAST]  # the old prev.pt is gone too
