"""Executes the notebooks in ``notebooks/`` in their quick mode.

The stored notebooks carry the outputs of a full-size run; this test runs
them small (``ADAFISHER_NOTEBOOK_QUICK=1``) in memory and never writes them
back. It fails on any cell error. ``python tests/test_notebooks.py`` instead
re-executes them at full size and stores the outputs (a few minutes each).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / 'notebooks'
DATA = Path(os.environ.get('ADAFISHER_DATA', ROOT / '.cache' / 'data'))


def _kernel_env(quick: bool) -> dict[str, str]:
  env = dict(os.environ)
  env['ADAFISHER_DATA'] = str(DATA)
  env['ADAFISHER_NOTEBOOK_QUICK'] = '1' if quick else '0'
  env.pop('MPLBACKEND', None)  # ipykernel's inline backend keeps the figures
  # conftest.py asks for 8 virtual CPU devices; the notebooks need one.
  flags = re.sub(
    r'--xla_force_host_platform_device_count=\d+', '', env.get('XLA_FLAGS', '')
  ).strip()
  if flags:
    env['XLA_FLAGS'] = flags
  else:
    env.pop('XLA_FLAGS', None)
  return env


def fetch_data() -> None:
  """Fetches Fashion-MNIST once, even with several pytest-xdist workers."""
  if (DATA / 'fashion_mnist.npz').exists():
    return
  DATA.mkdir(parents=True, exist_ok=True)
  with open(DATA / '.fetch.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (DATA / 'fashion_mnist.npz').exists():
      sys.path.insert(0, str(ROOT))
      from benchmarks import datasets

      datasets.fashion_mnist(DATA)


def execute(path: Path, *, quick: bool, timeout: int):
  import nbclient
  import nbformat

  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    notebook,
    timeout=timeout,
    kernel_name='python3',
    resources={'metadata': {'path': str(path.parent)}},
    coalesce_streams=True,
  )
  client.execute(env=_kernel_env(quick))
  return notebook


@pytest.mark.parametrize(
  'name', sorted(p.name for p in NOTEBOOKS.glob('*.ipynb'))
)
def test_notebook_runs(name):
  pytest.importorskip('nbclient')
  pytest.importorskip('ipykernel')
  if (
    not (DATA / 'fashion_mnist.npz').exists()
    and shutil.which('apt-get') is None
  ):
    pytest.skip('Fashion-MNIST is not cached and apt-get is unavailable')
  fetch_data()
  execute(NOTEBOOKS / name, quick=True, timeout=600)


if __name__ == '__main__':
  import nbformat

  names = sys.argv[1:] or sorted(p.name for p in NOTEBOOKS.glob('*.ipynb'))
  fetch_data()
  for name in names:
    path = NOTEBOOKS / name
    print(f'executing {path} at full size', flush=True)
    nbformat.write(execute(path, quick=False, timeout=3600), path)
