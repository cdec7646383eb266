"""Real datasets from the package registries (nothing else is downloaded).

* Fashion-MNIST: Debian package ``dataset-fashion-mnist`` (``apt-get
  download`` + ``dpkg -x`` into a cache folder; no system install).
* digits: scikit-learn's bundled 8x8 digits (for fast tests).
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

CACHE = Path(
  os.environ.get(
    'ADAFISHER_DATA', Path(__file__).resolve().parents[1] / '.cache' / 'data'
  )
)
FASHION_PACKAGE = 'dataset-fashion-mnist'
FASHION_FILES = {
  'x_train': 'train-images-idx3-ubyte.gz',
  'y_train': 'train-labels-idx1-ubyte.gz',
  'x_test': 't10k-images-idx3-ubyte.gz',
  'y_test': 't10k-labels-idx1-ubyte.gz',
}


def _read_idx(path: Path) -> np.ndarray:
  with gzip.open(path, 'rb') as f:
    data = f.read()
  ndim = data[3]
  shape = tuple(
    int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim)
  )
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
  return subprocess.run(command, cwd=cwd, capture_output=True, text=True)


def _download_deb(package: str, folder: Path) -> Path:
  """``apt-get download`` the package, refreshing the lists once if needed."""
  folder.mkdir(parents=True, exist_ok=True)
  for deb in folder.glob(f'{package}_*.deb'):
    return deb
  if shutil.which('apt-get') is None:
    raise RuntimeError(
      f'apt-get is needed to fetch the Debian package {package}.'
    )
  result = _run(['apt-get', 'download', package], folder)
  if result.returncode != 0:
    sudo = [] if os.geteuid() == 0 or not shutil.which('sudo') else ['sudo']
    _run(sudo + ['apt-get', 'update', '-qq'], folder)
    result = _run(['apt-get', 'download', package], folder)
  debs = list(folder.glob(f'{package}_*.deb'))
  if result.returncode != 0 or not debs:
    raise RuntimeError(
      f'apt-get download {package} failed:\n{result.stdout}{result.stderr}'
    )
  return debs[0]


def fashion_mnist(cache: Path = CACHE) -> dict[str, np.ndarray]:
  """Fashion-MNIST as uint8 images ``[N, 28, 28]`` and int labels.

  Returns:
    ``{'x_train', 'y_train', 'x_test', 'y_test'}`` (60000 / 10000 examples).
  """
  cached = cache / 'fashion_mnist.npz'
  if not cached.exists():
    deb = _download_deb(FASHION_PACKAGE, cache / 'debs')
    extracted = cache / 'fashion_mnist_deb'
    subprocess.run(['dpkg', '-x', str(deb), str(extracted)], check=True)
    folder = extracted / 'usr' / 'share' / 'datasets' / 'fashion-mnist'
    arrays = {k: _read_idx(folder / f) for k, f in FASHION_FILES.items()}
    np.savez_compressed(cached, **arrays)
    shutil.rmtree(extracted)
  with np.load(cached) as data:
    return {k: data[k] for k in FASHION_FILES}


def digits() -> dict[str, np.ndarray]:
  """scikit-learn's 1797 8x8 digits, split 1500 train / 297 test."""
  from sklearn.datasets import load_digits

  data = load_digits()
  x = data.images.astype(np.float32) / 16.0
  y = data.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  x, y = x[order], y[order]
  return {
    'x_train': x[:1500],
    'y_train': y[:1500],
    'x_test': x[1500:],
    'y_test': y[1500:],
  }


def as_images(x: np.ndarray) -> np.ndarray:
  """uint8 ``[N, H, W]`` to float32 ``[N, H, W, 1]`` in [0, 1]."""
  x = x.astype(np.float32)
  if x.max() > 1.0:
    x /= 255.0
  return x[..., None]
