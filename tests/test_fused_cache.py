"""DHSPG's compiled kernels are cached once per machine, keyed by what the build depends on."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fxprune.optim._fused as fused

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path(fused.__file__).with_name("_fused.cpp")


def test_the_key_is_the_content_not_the_path(tmp_path):
    src = SOURCE.read_bytes()
    copy = tmp_path / "elsewhere" / "_fused.cpp"
    copy.parent.mkdir()
    copy.write_bytes(src)
    cflags, ldflags = fused._flags()
    key = fused.cache_key(src, cflags, ldflags)
    assert fused.build_spec(copy)[0] == fused.build_spec(SOURCE)[0] == f"fxprune_dhspg_{key}"
    assert fused.cache_key(src + b"\n// changed\n", cflags, ldflags) != key
    assert fused.cache_key(src, cflags + ["-DX"], ldflags) != key
    assert torch.__version__  # part of the key: a new torch builds its own


def test_the_build_directory_is_torchs_for_that_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    name, directory = fused.build_spec()
    assert directory == os.path.join(str(tmp_path), name) and os.path.isdir(directory)
    path = fused._source_in(directory, name, SOURCE.read_bytes())
    stamp = os.stat(path).st_mtime_ns
    assert fused._source_in(directory, name, b"never written over") == path
    assert os.stat(path).st_mtime_ns == stamp and Path(path).read_bytes() == SOURCE.read_bytes()
    assert os.listdir(directory) == [os.path.basename(path)]  # no temporary file left behind


def _copy_of_the_package(root: Path) -> Path:
    """A second checkout: the package's sources under another path."""
    for part in ("fxprune", "passes"):
        shutil.copytree(REPO / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "fxprune" / "passes").symlink_to(root / "passes")  # as the editable install maps it
    return root


def _kernels_in_subprocess(pythonpath: Path, ext_dir: str) -> str:
    code = ("import sys\n"  # this checkout's editable install must not win over the copy
            "sys.meta_path = [f for f in sys.meta_path if not type(f).__module__.startswith('__editable__')]\n"
            f"sys.path.insert(0, {str(pythonpath)!r})\n"
            "import fxprune.optim._fused as f\n"
            "f.kernels()\nname, d = f.build_spec()\nprint(f.__file__)\nprint(d)\n")
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=ext_dir)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_another_checkout_reuses_the_build(tmp_path):
    """The kernels this session built are loaded, not rebuilt, from a copy of the package."""
    fused.kernels()
    name, directory = fused.build_spec()
    lib = os.path.join(directory, f"{name}.so")
    stamp = os.stat(lib).st_mtime_ns
    out = _kernels_in_subprocess(_copy_of_the_package(tmp_path / "checkout"),
                                 os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.dirname(directory))
    module_file, used = out.split()
    assert module_file.startswith(str(tmp_path / "checkout"))  # the copy's code ran
    assert used == directory and os.stat(lib).st_mtime_ns == stamp  # and loaded the same build


@pytest.mark.slow
def test_concurrent_first_builds_do_not_corrupt_each_other(tmp_path):
    """Three processes start together on an empty cache: one builds, the others wait on
    torch's lock and load that build; every one gets working kernels."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("import torch, fxprune.optim._fused as f\n"
            "x = torch.ones(4, 3); g = torch.ones(4, 3); b = torch.zeros(4, 3)\n"
            "f.sgd_step([x], [g], [b], [-1], 0.0, 0.0, 0.5)\n"
            "assert torch.equal(x, torch.full((4, 3), 0.5)), x\nprint('ok')\n")
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and out.strip() == "ok", err
    builds = list((tmp_path / "ext").glob("fxprune_dhspg_*/*.so"))
    assert len(builds) == 1, builds
    print(f"three concurrent first loads: {time.time() - t0:.1f} s")
