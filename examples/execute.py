"""Execute the example notebooks with nbclient, in the Python environment that runs this file.

    python examples/execute.py                  # every notebook, full settings, outputs saved in place
    python examples/execute.py --short 01_quickstart.ipynb   # quick settings, outputs not saved

The kernel is always the running interpreter (``sys.executable -m ipykernel_launcher``): its
kernel spec is written to a temporary directory and handed to nbclient through a
``jupyter_client`` kernel manager, so no ``python3`` kernel needs to be registered, and one
registered for another interpreter is never picked up by mistake. Needs ``nbclient``,
``nbformat`` and ``ipykernel``.

The notebooks read ``FXPRUNE_NOTEBOOK_SHORT`` (:data:`SHORT_ENV`): ``1`` selects tiny data
subsets and a few training steps, for tests; unset, they train long enough to show a real
result.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

EXAMPLES = Path(__file__).resolve().parent
NOTEBOOKS = ("01_quickstart.ipynb", "02_passes.ipynb", "03_erase_and_ato.ipynb")
SHORT_ENV = "FXPRUNE_NOTEBOOK_SHORT"
KERNEL_NAME = "python3"


def execute(path: Path, *, short: bool, timeout: Optional[int] = None, save: bool = False):
    """Run every cell of the notebook at ``path`` (working directory: its folder) in a fresh
    kernel of the running interpreter.

    Args:
        path: the ``.ipynb`` file.
        short: set ``FXPRUNE_NOTEBOOK_SHORT=1`` in the kernel (quick settings).
        timeout: seconds allowed per cell (None: no limit).
        save: write the executed notebook, outputs included, back to ``path``.

    Returns:
        The executed ``nbformat.NotebookNode``.

    Raises:
        nbclient.exceptions.CellExecutionError: a cell raised; the message names the cell
            and carries the traceback.
        nbclient.exceptions.CellTimeoutError: a cell ran longer than ``timeout``.
    """
    import nbformat
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    env.pop(SHORT_ENV, None)
    if short:
        env[SHORT_ENV] = "1"
    with tempfile.TemporaryDirectory() as kernels:
        write_kernel_spec(os.path.join(kernels, KERNEL_NAME))  # argv[0] is sys.executable
        specs = KernelSpecManager(kernel_dirs=[kernels], ensure_native_kernel=False)
        km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
        # resources' path is the kernel's working directory
        client = NotebookClient(nb, km=km, timeout=timeout, kernel_name=KERNEL_NAME,
                                resources={"metadata": {"path": str(path.parent)}})
        # the kernel sees exactly `env`; cleanup_kc: a client handed a kernel manager would
        # otherwise leave the kernel running
        client.execute(env=env, cleanup_kc=True)
    if save:
        nbformat.write(nb, path)
    return nb


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", default=list(NOTEBOOKS),
                        help="notebook files, relative to examples/ (default: all)")
    parser.add_argument("--short", action="store_true", help="quick settings; outputs are not saved")
    parser.add_argument("--timeout", type=int, default=None, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    for name in args.notebooks:
        path = EXAMPLES / name
        print(f"executing {path.name}{' (short)' if args.short else ''}", flush=True)
        execute(path, short=args.short, timeout=args.timeout, save=not args.short)
    return 0


if __name__ == "__main__":
    sys.exit(main())
