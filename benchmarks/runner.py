"""Training runs: one arm, many (learning rate, seed, horizon) runs at once.

A run is ``(learning_rate, seed, steps)``: the seed fixes the initialisation
and the batch order (:meth:`benchmarks.tasks.Task.indices`), the learning
rate is the peak of the schedule, ``steps`` its horizon. The schedule is
the same for every arm: linear warmup over the first 5% of the horizon
(from ``peak / warmup`` on the first update to the peak), then cosine to
zero at the horizon.

Runs of an optax or AdaFisher arm train together: one jitted ``lax.scan``
over steps of a ``jax.vmap`` over runs, so an arm compiles once per number
of runs and its learning rates and seeds share every kernel. A run whose
horizon is reached stops moving (its updates are discarded) while longer
ones go on. kfac-jax runs one at a time (it compiles its own step).

Every run reports its validation curve (a point every ``horizon /
curve_points`` steps and at its horizon), its final validation scores and,
if asked, its test scores at the horizon.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import optimizers
from benchmarks.optimizers import Arm
from benchmarks.tasks import Task

WARMUP_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class Run:
  learning_rate: float | None  # None: the arm adapts its own (kfac-jax)
  seed: int
  steps: int


def schedule(count, peak, horizon):
  """The learning rate of update ``count`` (0-based) of a run.

  Linear warmup over ``w = max(1, round(0.05 * horizon))`` updates
  (``peak * (count + 1) / w``), then ``peak * (1 + cos(pi * p)) / 2`` with
  ``p = (count - w) / (horizon - w)``: the peak at ``count = w``, zero at
  ``count = horizon``. ``peak`` and ``horizon`` may be traced.
  """
  t = jnp.asarray(count, jnp.float32)
  horizon = jnp.asarray(horizon, jnp.float32)
  warmup = jnp.maximum(1.0, jnp.round(WARMUP_FRACTION * horizon))
  progress = jnp.clip((t - warmup) / jnp.maximum(horizon - warmup, 1.0), 0, 1)
  cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return peak * jnp.where(t < warmup, (t + 1.0) / warmup, cosine)


def curve_steps(horizon: int, curve_points: int) -> int:
  """Steps between validation points (the scan length of one chunk)."""
  return max(1, math.ceil(horizon / curve_points))


def _select(active, new, old):
  return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)


def step_fn(task: Task, arm: Arm, capture: bool = True):
  """``step(params, model_state, opt_state, peak, horizon, t, x, y)`` of one
  run: the update of step ``t`` (nothing once ``t >= horizon``).

  Training runs capture AdaFisher's statistics on every step (the optimizer
  refreshes when due, exactly as a loop that captures on refresh steps
  only); ``capture=False`` is the program of the other steps, timed by
  :func:`step_times`.
  """
  grad_fn = optimizers.gradients(arm, task.loss)

  def step(params, model_state, opt_state, peak, horizon, t, x, y):
    tx = optimizers.make(arm, lambda c: schedule(c, peak, horizon))
    (loss, new_state), grads, curvature = grad_fn(
      params, model_state, x, y, capture=capture
    )
    updates, new_opt = optimizers.update(
      tx, grads, opt_state, params, curvature
    )
    new_params = optax.apply_updates(params, updates)
    active = t < horizon
    return (
      _select(active, new_params, params),
      _select(active, new_state, model_state),
      _select(active, new_opt, opt_state),
      loss,
    )

  return step


def init_fn(task: Task, arm: Arm):
  """``init(seed, peak, horizon) -> (params, model_state, opt_state)``."""

  def init(seed, peak, horizon):
    params, model_state = task.init(jax.random.key(seed))
    tx = optimizers.make(arm, lambda c: schedule(c, peak, horizon))
    return params, model_state, tx.init(params)

  return init


class Evaluator:
  """Validation and test scores of many runs at once (vmapped)."""

  def __init__(self, task: Task):
    self.task = task
    self._scores = jax.jit(jax.vmap(task.scores, in_axes=(0, 0, None, None)))

  def __call__(self, params, model_state, split: str) -> list[dict]:
    x, y = self.task.splits[split]
    size = self.task.eval_batch
    correct = total = 0.0
    for i in range(0, len(x), size):
      hits, losses = self._scores(
        params, model_state, x[i : i + size], y[i : i + size]
      )
      correct = correct + np.asarray(hits, np.float64)
      total = total + np.asarray(losses, np.float64)
    return [
      {'accuracy': float(c) / y.size, 'loss': float(s) / y.size}
      for c, s in zip(np.atleast_1d(correct), np.atleast_1d(total))
    ]


def _curves(points, horizons):
  """Per run: the curve points up to its horizon, the last one relabelled
  with the horizon (a finished run no longer moves)."""
  curves = []
  for r, horizon in enumerate(horizons):
    curve = []
    for step, scores, train_loss in points:
      entry = {'step': min(step, horizon), **scores[r]}
      if train_loss is not None:
        entry['train_loss'] = train_loss[r]
      curve.append(entry)
      if step >= horizon:
        break
    curves.append(curve)
  return curves


def train(
  task: Task,
  arm: Arm,
  runs: list[Run],
  *,
  curve_points: int = 12,
  test: bool = False,
  evaluator: Evaluator | None = None,
) -> list[dict[str, Any]]:
  """Trains ``runs`` of ``arm`` on ``task``; one result dict per run."""
  if arm.family == 'kfac':
    return _train_kfac(task, arm, runs, curve_points, test, evaluator)
  evaluator = evaluator or Evaluator(task)
  start = time.perf_counter()
  peaks = jnp.asarray([r.learning_rate for r in runs], jnp.float32)
  horizons = [r.steps for r in runs]
  horizon_arr = jnp.asarray(horizons, jnp.int32)
  seeds = jnp.asarray([r.seed for r in runs], jnp.int32)
  every = curve_steps(max(horizons), curve_points)
  chunks = math.ceil(max(horizons) / every)
  tables = {s: task.indices(s, chunks * every) for s in {r.seed for r in runs}}
  idx = np.stack([tables[r.seed] for r in runs], axis=1)  # [steps, R, B]
  data = jax.device_put(task.data)
  with warnings.catch_warnings():
    warnings.simplefilter('error', optimizers.Unpreconditioned)
    params, model_state, opt_state = jax.jit(jax.vmap(init_fn(task, arm)))(
      seeds, peaks, horizon_arr
    )
    vstep = jax.vmap(step_fn(task, arm), in_axes=(0, 0, 0, 0, 0, None, 0, 0))

    def chunk(params, model_state, opt_state, t0, idx, data):
      def body(carry, batch_idx):
        params, model_state, opt_state, t = carry
        x, y = task.gather(data, batch_idx)
        params, model_state, opt_state, loss = vstep(
          params, model_state, opt_state, peaks, horizon_arr, t, x, y
        )
        return (params, model_state, opt_state, t + 1), loss

      (params, model_state, opt_state, _), losses = jax.lax.scan(
        body, (params, model_state, opt_state, t0), idx
      )
      return params, model_state, opt_state, losses

    chunk = jax.jit(chunk, donate_argnums=(0, 1, 2))
    points = [(0, evaluator(params, model_state, 'validation'), None)]
    for c in range(chunks):
      t0 = c * every
      params, model_state, opt_state, losses = chunk(
        params,
        model_state,
        opt_state,
        jnp.asarray(t0, jnp.int32),
        idx[t0 : t0 + every],
        data,
      )
      losses = np.asarray(losses, np.float64)  # [every, R]
      steps = np.arange(t0, t0 + every)[:, None]
      active = steps < np.asarray(horizons)[None]
      train_loss = (np.where(active, losses, 0).sum(0)) / np.maximum(
        active.sum(0), 1
      )
      points.append(
        (
          t0 + every,
          evaluator(params, model_state, 'validation'),
          [float(v) for v in train_loss],
        )
      )
  tests = evaluator(params, model_state, 'test') if test else None
  seconds = time.perf_counter() - start
  return _results(task, runs, _curves(points, horizons), tests, seconds)


def _results(task, runs, curves, tests, seconds):
  results = []
  for r, run in enumerate(runs):
    final = {
      k: v for k, v in curves[r][-1].items() if k in ('loss', 'accuracy')
    }
    results.append(
      {
        'learning_rate': run.learning_rate,
        'seed': run.seed,
        'steps': run.steps,
        'validation': final,
        'test': tests[r] if tests else None,
        'trains': task.trains(final),
        'curve': curves[r],
        'program_seconds': seconds,
        'runs_in_program': len(runs),
      }
    )
  return results


def _train_kfac(task, arm, runs, curve_points, test, evaluator):
  from benchmarks import kfac

  evaluator = evaluator or Evaluator(task)
  options = {k: v for k, v in arm.kwargs.items()}
  step, init = kfac.make_kfac_train_step(task.model, 0.0, **options)
  data = jax.device_put(task.data)
  gather = jax.jit(task.gather)
  expand = jax.jit(lambda tree: jax.tree.map(lambda a: a[None], tree))
  results = []
  for run in runs:
    start = time.perf_counter()
    every = curve_steps(run.steps, curve_points)
    table = task.indices(run.seed, run.steps)
    params, model_state = task.init(jax.random.key(run.seed))
    x, y = gather(data, table[0])
    lr = 0.0 if run.learning_rate is None else run.learning_rate
    opt_state = init(
      params, model_state, x, y, learning_rate=lr, rng_seed=run.seed
    )

    def scores(params, model_state, split):
      return evaluator(expand(params), expand(model_state), split)[0]

    points = [(0, [scores(params, model_state, 'validation')], None)]
    losses = []
    for t in range(run.steps):
      x, y = gather(data, table[t])
      params, model_state, opt_state, loss = step(
        params, model_state, opt_state, x, y
      )
      losses.append(loss)
      if (t + 1) % every == 0 or t + 1 == run.steps:
        mean = float(np.mean([float(v) for v in losses]))
        losses = []
        points.append(
          (t + 1, [scores(params, model_state, 'validation')], [mean])
        )
    tests = [scores(params, model_state, 'test')] if test else None
    seconds = time.perf_counter() - start
    results += _results(
      task, [run], _curves(points, [run.steps]), tests, seconds
    )
  return results


def _scan_advance(task, arm, capture, lr, horizon, x, y, steps):
  """A call that trains one run ``steps`` steps (one jitted ``lax.scan``) of
  one of the arm's programs, compiled and run once untimed."""
  one = step_fn(task, arm, capture)

  def scan(params, model_state, opt_state):
    def body(carry, _):
      params, model_state, opt_state, loss = one(*carry, lr, horizon, 0, x, y)
      return (params, model_state, opt_state), loss

    carry, losses = jax.lax.scan(
      body, (params, model_state, opt_state), None, steps
    )
    return carry, losses[-1]

  scan = jax.jit(scan, donate_argnums=(0, 1, 2))
  state = list(init_fn(task, arm)(0, lr, horizon))

  def advance():
    carry, loss = scan(*state)
    state[:] = carry
    jax.block_until_ready((carry, loss))

  advance()
  return advance


def _kfac_advance(task, arm, x, y, steps):
  """As :func:`_scan_advance`, for kfac-jax's own compiled step."""
  from benchmarks import kfac

  step, init = kfac.make_kfac_train_step(task.model, 0.0, **arm.kwargs)
  params, model_state = task.init(jax.random.key(0))
  opt_state = init(params, model_state, x, y, learning_rate=1e-4)
  state = [params, model_state, opt_state]

  def advance(steps=steps):
    for _ in range(steps):
      *state[:], loss = step(*state, x, y)
    # All of the state: kfac-jax's step returns its loss before its
    # curvature and inverse updates finish, and their tail would be timed as
    # part of the next arm's round.
    jax.block_until_ready((state, loss))

  # kfac-jax compiles other programs for the steps that refresh its inverses
  # or adapt its damping (every 5 steps): all of them now.
  advance(steps=10)
  return advance


def step_times(
  task: Task,
  arms: list[Arm],
  *,
  rounds: int,
  steps_per_round: int,
  learning_rates: dict[str, float] | None = None,
) -> dict[str, Any]:
  """Seconds per step of one run of each arm, from interleaved rounds.

  Every arm trains one run (seed 0) on the same batch; a round calls each
  program, in a new random order, for ``steps_per_round`` steps (one jitted
  ``lax.scan``; for kfac-jax its own compiled step, called in a loop),
  through :func:`benchmarks.measure.interleaved_rounds`, after a compiled
  warm-up round. An AdaFisher arm that refreshes every ``p > 1`` steps has
  two programs (``name``: the refresh step, ``name/plain``: the others) and
  costs ``(refresh + (p - 1) * plain) / p`` per step. Returns the per-round
  seconds per step, their medians and each arm's ratio to the first arm's
  (Adam's), which is the ratio used.
  """
  from benchmarks.measure import interleaved_rounds

  learning_rates = learning_rates or {}
  data = jax.device_put(task.data)
  x, y = jax.jit(task.gather)(data, task.indices(0, 1)[0])
  horizon = jnp.asarray(10**6, jnp.int32)
  advances, periods = {}, {}
  for arm in arms:
    lr = jnp.asarray(learning_rates.get(arm.name, 1e-4), jnp.float32)
    if arm.family == 'kfac':
      advances[arm.name] = _kfac_advance(task, arm, x, y, steps_per_round)
      continue
    periods[arm.name] = optimizers.refresh_period(arm)
    programs = [True] + [False] * (periods[arm.name] > 1)
    for capture in programs:
      name = arm.name if capture else f'{arm.name}/plain'
      advances[name] = _scan_advance(
        task, arm, capture, lr, horizon, x, y, steps_per_round
      )
  walls, cpus = interleaved_rounds(
    advances,
    rounds,
    desc=f'{task.name}: timing',
    shuffle=np.random.default_rng(0),
  )

  def per_arm(times):
    """Per arm and round, seconds per step (amortised over two programs)."""
    out = {}
    for arm in arms:
      refresh = np.asarray(times[arm.name]) / steps_per_round
      p = periods.get(arm.name, 1)
      if p > 1:
        plain = np.asarray(times[f'{arm.name}/plain']) / steps_per_round
        refresh = (refresh + (p - 1) * plain) / p
      out[arm.name] = [float(t) for t in refresh]
    return out

  def ratios(values):
    return {n: v / values[arms[0].name] for n, v in values.items()}

  wall, cpu = per_arm(walls), per_arm(cpus)
  medians = {n: float(np.median(v)) for n, v in wall.items()}
  fastest = {n: float(np.min(v)) for n, v in wall.items()}
  cpu_medians = {n: float(np.median(v)) for n, v in cpu.items()}
  programs = {
    n: float(np.median(v)) / steps_per_round for n, v in walls.items()
  }
  return {
    'rounds': rounds,
    'steps_per_round': steps_per_round,
    'reference': arms[0].name,
    'order': 'shuffled every round (default_rng(0))',
    'refresh_periods': periods,
    'median_seconds_per_step_by_program': programs,
    'seconds_per_step': wall,
    'median_seconds_per_step': medians,
    'ratio': ratios(medians),
    # For the record (not used): the fastest round, and process CPU time.
    'ratio_of_fastest_rounds': ratios(fastest),
    'process_cpu_seconds_per_step': cpu_medians,
    'ratio_of_process_cpu': ratios(cpu_medians),
  }
