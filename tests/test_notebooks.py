"""The example notebooks run end to end and reach their results.

Each notebook in examples/ ends with a cell that asserts its own results (slim model equal to
the trained one, sizes reduced, targets met) and prints them as one line ``result: {json}``.
These tests execute the notebooks with nbclient in a kernel of the running interpreter
(``examples/execute.py``), with ``FXPRUNE_NOTEBOOK_SHORT=1`` (tiny data subsets, one epoch),
and check that line; a cell that raises fails the test with its traceback. The erase/ATO
notebook compiles and trains two super-networks (about 80 s of CPU time), the longest test
of the default tier.

The stored notebooks are checked too: executed in full (no short setting), with no errors.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CELL_TIMEOUT = 300  # seconds per cell, generous for a loaded machine
RESULT = "result: "


def _runner():
    spec = importlib.util.spec_from_file_location("fxprune_examples_execute", EXAMPLES / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runner = _runner()


def _result(nb) -> dict:
    """The ``result: {json}`` line the notebook's last cell prints; asserts that no cell failed."""
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors[0]
    last = nb.cells[-1]
    text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    lines = [line for line in text.splitlines() if line.startswith(RESULT)]
    assert len(lines) == 1, f"the last cell printed no result line: {text!r}"
    return json.loads(lines[0][len(RESULT):])


@pytest.fixture
def run_short(tmp_path, monkeypatch):
    """Execute a notebook with the short setting; the files it writes go under ``tmp_path``."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # read by the kernel's tempfile module

    def run(name: str) -> dict:
        return _result(runner.execute(EXAMPLES / name, short=True, timeout=CELL_TIMEOUT))

    return run


def test_quickstart(run_short):
    r = run_short("01_quickstart.ipynb")
    assert r["short"] is True
    assert r["full_accuracy"] == r["slim_accuracy"]
    assert r["max_abs_diff"] < 1e-4
    assert r["group_sparsity"] == 0.5
    # half of the channels gone: at most about half of the FLOPs left, far fewer parameters
    assert r["flops_ratio"] < 0.6 and r["params_ratio"] < 0.5


def test_passes(run_short):
    r = run_short("02_passes.ipynb")
    block, vit = r["basic_block"], r["vit_block"]
    assert block["max_abs_diff"] < 1e-5 and vit["max_abs_diff"] < 1e-5
    # basic block 16 -> 16, every other inner channel removed: conv1 8x16x3x3, bn1 2x8, conv2 16x8x3x3, bn2 2x16
    assert block["params_slim"] == 8 * 16 * 9 + 2 * 8 + 16 * 8 * 9 + 2 * 16
    # ViT block (width 32, 4 heads of 8, MLP 64): 2 heads and 32 hidden units left
    norms, qkv, proj, fc1, fc2 = 2 * 2 * 32, 32 * 48 + 48, 16 * 32 + 32, 32 * 32 + 32, 32 * 32 + 32
    assert vit["params_slim"] == norms + qkv + proj + fc1 + fc2


def test_erase_and_ato(run_short):
    r = run_short("03_erase_and_ato.ipynb")
    assert r["short"] is True
    erase, ato = r["erase"], r["ato"]
    assert erase["erasable"] == 45 and erase["erased"] == 22
    assert erase["full_accuracy"] == erase["slim_accuracy"] and erase["flops_ratio"] < 1
    assert abs(ato["flops_ratio"] - ato["target_flops_ratio"]) <= 0.02
    assert ato["full_accuracy"] == ato["slim_accuracy"]


@pytest.mark.parametrize("name", runner.NOTEBOOKS)
def test_stored_notebook_is_a_full_run(name):
    """The notebooks in the repository show the outputs of a full run: every code cell ran,
    in order, without error, and the last one printed its result."""
    nb = nbformat.read(EXAMPLES / name, as_version=4)
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1))
    # the notebooks that train record whether they ran with the short setting
    assert _result(nb).get("short", False) is False
