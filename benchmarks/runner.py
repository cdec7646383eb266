"""Training runs: one arm, many (learning rate, decay, seed, horizon) runs.

A run is ``(learning_rate, seed, steps, weight_decay)``: the seed fixes the
initialisation and the batch order (:meth:`benchmarks.tasks.Task.indices`),
the learning rate is the peak of the schedule, ``steps`` its horizon,
``weight_decay`` (arms that have one) replaces the arm's own. The schedule
is the same for every arm: linear warmup over the first 5% of the horizon
(from ``peak / warmup`` on the first update to the peak), then cosine to
zero at the horizon.

Each run trains alone, one after the other, as the README's loop: a
Python loop over one jitted, donated step whose learning rate, decay,
horizon and batch are arguments, so an arm compiles once (AdaFisher: its
refresh and plain steps, chosen by the flags of
:func:`benchmarks.optimizers.refresh_flags`, the same for every run), and
a run's result does not depend on the other runs: the same run gives the
same bits in any process, which is what the replication checks. (On
XLA:CPU a convolution inside ``lax.scan`` ran 10x slower than the same step
jitted alone, and a vmapped one 2-4x slower: hence no scan and no vmap.)
kfac-jax runs its own compiled step in the same loop.

Every run reports its validation curve (a point every ``horizon /
curve_points`` steps and at its horizon), its final validation scores and,
if asked, its test scores at the horizon.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import optimizers, stats
from benchmarks.measure import interleaved_rounds
from benchmarks.optimizers import Arm
from benchmarks.tasks import Task

WARMUP_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class Run:
  learning_rate: float | None  # None: the arm adapts its own (kfac-jax)
  seed: int
  steps: int
  weight_decay: float | None = None  # None: the arm's own


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


def _transformation(arm: Arm, hyper, layout=None):
  """The arm's optax transformation for ``hyper = (peak, horizon,
  weight_decay)`` (traced); ``layout``: AdaFisher's factor shapes."""
  peak, horizon, decay = hyper
  return optimizers.make(
    arm,
    lambda c: schedule(c, peak, horizon),
    weight_decay=decay if arm.decays else None,
    layout=layout,
  )


def layout_of(task: Task, arm: Arm):
  """AdaFisher's factor shapes for the task's model (``None`` for other
  arms), as the README sizes them: ``curvature_layout`` on one batch."""
  if not arm.captures:
    return None
  params, model_state = task.init(jax.random.key(0))
  x, y = task.gather(task.data, task.indices(0, 1)[0])
  grad_fn = optimizers.curvature_grad(task.loss)
  return optimizers.curvature_layout(grad_fn, params, model_state, x, y)


def step_fn(task: Task, arm: Arm, capture: bool = True, layout=None):
  """``step(params, model_state, opt_state, hyper, x, y)`` of one run;
  ``capture`` (static): whether AdaFisher's statistics are captured."""
  grad_fn = optimizers.gradients(arm, task.loss)

  def step(params, model_state, opt_state, hyper, x, y):
    tx = _transformation(arm, hyper, layout)
    (loss, model_state), grads, curvature = grad_fn(
      params, model_state, x, y, capture=capture
    )
    updates, opt_state = optimizers.update(
      tx, grads, opt_state, params, curvature
    )
    return optax.apply_updates(params, updates), model_state, opt_state, loss

  return step


def init_fn(task: Task, arm: Arm, layout=None):
  """``init(seed, hyper) -> (params, model_state, opt_state)``."""

  def init(seed, hyper):
    params, model_state = task.init(jax.random.key(seed))
    tx = _transformation(arm, hyper, layout)
    return params, model_state, tx.init(params)

  return init


def _hyper(run: Run, arm: Arm):
  decay = run.weight_decay
  if decay is None:
    decay = arm.kwargs.get('weight_decay', 0.0)
  return (
    jnp.asarray(run.learning_rate, jnp.float32),
    jnp.asarray(run.steps, jnp.int32),
    jnp.asarray(decay, jnp.float32),
  )


class Evaluator:
  """Validation and test scores of one run's parameters."""

  def __init__(self, task: Task):
    self.task = task
    self._scores = jax.jit(task.scores)

  def __call__(self, params, model_state, split: str) -> dict[str, float]:
    x, y = self.task.splits[split]
    size = self.task.eval_batch
    correct = total = 0.0
    for i in range(0, len(x), size):
      hits, losses = self._scores(
        params, model_state, x[i : i + size], y[i : i + size]
      )
      correct += float(hits)
      total += float(losses)
    return {'accuracy': correct / y.size, 'loss': total / y.size}


class Program:
  """One arm's compiled steps, reused by every run of the arm: ``steps[
  capture](state, hyper, batch_idx, data) -> (state, loss)``, the state
  donated; AdaFisher has two (capture on its refresh steps), as the
  README's loop."""

  def __init__(self, task: Task, arm: Arm):
    self.task, self.arm = task, arm
    layout = layout_of(task, arm)
    self.init = jax.jit(init_fn(task, arm, layout))
    self.steps = {}
    for capture in (True, False) if arm.captures else (False,):
      step = step_fn(task, arm, capture, layout)
      self.steps[capture] = self._compile(step)
    self._flags = np.zeros(0, bool)

  def _compile(self, step):
    gather = self.task.gather

    def one(state, hyper, batch_idx, data):
      x, y = gather(data, batch_idx)
      *state, loss = step(*state, hyper, x, y)
      return tuple(state), loss

    return jax.jit(one, donate_argnums=(0,))

  def flags(self, count: int) -> np.ndarray:
    """Refresh flags of the first ``count`` updates (capture steps): those
    of a new state, the same for every run."""
    if not self.arm.captures:
      return np.zeros(count, bool)
    if len(self._flags) < count:
      state = self.init(0, _hyper(Run(1e-3, 0, count), self.arm))[2]
      schedule = optimizers.refresh_flags(self.arm, state)
      self._flags = np.fromiter(itertools.islice(schedule, count), bool, count)
    return self._flags[:count]


def _program(task, arm, cache) -> Program:
  if arm not in cache:
    cache[arm] = Program(task, arm)
  return cache[arm]


def train(
  task: Task,
  arm: Arm,
  runs: list[Run],
  *,
  curve_points: int = 12,
  test: bool = False,
  evaluator: Evaluator | None = None,
  programs: dict | None = None,
) -> list[dict[str, Any]]:
  """Trains ``runs`` of ``arm`` on ``task``, one after the other; one result
  dict per run (``programs``: a cache of compiled programs to share)."""
  if arm.family == 'kfac':
    return _train_kfac(task, arm, runs, curve_points, test, evaluator)
  evaluator = evaluator or Evaluator(task)
  programs = {} if programs is None else programs
  data = jax.device_put(task.data)
  results = []
  with warnings.catch_warnings():
    warnings.simplefilter('error', optimizers.Unpreconditioned)
    program = _program(task, arm, programs)
    for run in runs:
      every = curve_steps(run.steps, curve_points)
      results.append(
        _train_one(task, program, run, every, data, evaluator, test)
      )
  return results


def _train_one(task, program: Program, run: Run, every, data, evaluator, test):
  start = time.perf_counter()
  idx = task.indices(run.seed, run.steps)
  flags = program.flags(run.steps)
  hyper = _hyper(run, program.arm)
  state = program.init(run.seed, hyper)
  curve = [{'step': 0, **evaluator(state[0], state[1], 'validation')}]
  losses = []
  for t in range(run.steps):
    state, loss = program.steps[bool(flags[t])](state, hyper, idx[t], data)
    losses.append(loss)
    if (t + 1) % every == 0 or t + 1 == run.steps:
      curve.append(
        {
          'step': t + 1,
          **evaluator(state[0], state[1], 'validation'),
          'train_loss': float(np.mean(jax.device_get(losses))),
        }
      )
      losses = []
  tests = evaluator(state[0], state[1], 'test') if test else None
  return _result(task, run, curve, tests, time.perf_counter() - start, state)


def fingerprint(params) -> str:
  """SHA-256 of the parameters' bytes: equal bits, equal fingerprint."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.asarray(leaf).tobytes())
  return digest.hexdigest()[:16]


def _result(task, run, curve, tests, seconds, state):
  final = {k: v for k, v in curve[-1].items() if k in ('loss', 'accuracy')}
  return {
    'learning_rate': run.learning_rate,
    'weight_decay': run.weight_decay,
    'seed': run.seed,
    'steps': run.steps,
    'validation': final,
    'test': tests,
    'trains': task.trains(final),
    'curve': curve,
    'seconds': seconds,
    'fingerprint': fingerprint(state[0]),
  }


def _train_kfac(task, arm, runs, curve_points, test, evaluator):
  from benchmarks import kfac

  evaluator = evaluator or Evaluator(task)
  step, init = kfac.make_kfac_train_step(
    task.model, 0.0, loss=task.make_loss, output=task.output, **arm.kwargs
  )
  data = jax.device_put(task.data)
  gather = jax.jit(task.gather)
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
    curve = [{'step': 0, **evaluator(params, model_state, 'validation')}]
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
        scores = evaluator(params, model_state, 'validation')
        curve.append({'step': t + 1, **scores, 'train_loss': mean})
    tests = evaluator(params, model_state, 'test') if test else None
    seconds = time.perf_counter() - start
    results.append(_result(task, run, curve, tests, seconds, (params,)))
  return results


# ------------------------------------------------------------------ timing


def _loop_advance(program: Program, capture, lr, data, steps):
  """A call that trains one run ``steps`` steps of one of the arm's compiled
  steps (the training runs' own programs), run once untimed."""
  hyper = _hyper(Run(lr, 0, 10**6), program.arm)
  idx = program.task.indices(0, 1)[0]
  step = program.steps[capture]
  state = [program.init(0, hyper)]

  def advance():
    current = state[0]
    for _ in range(steps):
      current, loss = step(current, hyper, idx, data)
    jax.block_until_ready((current, loss))
    state[0] = current

  advance()
  return advance


def _kfac_advance(task, arm, x, y, steps):
  """As :func:`_scan_advance`, for kfac-jax's own compiled step."""
  from benchmarks import kfac

  step, init = kfac.make_kfac_train_step(
    task.model, 0.0, loss=task.make_loss, output=task.output, **arm.kwargs
  )
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


def _advances(task, arms, learning_rates, steps_per_round, programs):
  """The timed calls: one per program (AdaFisher: refresh and plain)."""
  data = jax.device_put(task.data)
  advances, periods = {}, {}
  for arm in arms:
    lr = learning_rates.get(arm.name) or 1e-4
    if arm.family == 'kfac':
      x, y = jax.jit(task.gather)(data, task.indices(0, 1)[0])
      advances[arm.name] = _kfac_advance(task, arm, x, y, steps_per_round)
      continue
    periods[arm.name] = optimizers.refresh_period(arm)
    program = _program(task, arm, programs)
    captures = [True] + [False] * (periods[arm.name] > 1)
    for capture in captures if arm.captures else [False]:
      name = arm.name if capture or not arm.captures else f'{arm.name}/plain'
      advances[name] = _loop_advance(
        program, capture, lr, data, steps_per_round
      )
  return advances, periods


def step_times(
  task: Task,
  arms: list[Arm],
  *,
  rounds: int,
  steps_per_round: int,
  learning_rates: dict[str, float] | None = None,
  programs: dict | None = None,
) -> dict[str, Any]:
  """Seconds per step of one run of each arm, from interleaved rounds.

  Every arm trains one run (seed 0) on the same batch; a round calls each
  program, in a new random order, for ``steps_per_round`` steps (a loop
  over the training runs' compiled step, from ``programs``; for kfac-jax
  its own compiled step),
  through :func:`benchmarks.measure.interleaved_rounds`, after a compiled
  warm-up round. An AdaFisher arm that refreshes every ``p > 1`` steps has
  two programs (``name``: the refresh step, ``name/plain``: the others) and
  costs ``(refresh + (p - 1) * plain) / p`` per step. Returns, per arm, the
  per-round seconds per step, their medians, and the ratio to the first
  arm's (Adam's): the geometric mean over rounds of the per-round ratio,
  with its 95% confidence interval (:func:`benchmarks.stats.ratio`).
  """
  programs = {} if programs is None else programs
  advances, periods = _advances(
    task, arms, learning_rates or {}, steps_per_round, programs
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

  wall, cpu = per_arm(walls), per_arm(cpus)
  reference = wall[arms[0].name]
  ratios = {n: stats.ratio(v, reference) for n, v in wall.items()}
  return {
    'rounds': rounds,
    'steps_per_round': steps_per_round,
    'reference': arms[0].name,
    'order': 'shuffled every round (default_rng(0))',
    'refresh_periods': periods,
    'median_seconds_per_step_by_program': {
      n: float(np.median(v)) / steps_per_round for n, v in walls.items()
    },
    'seconds_per_step': wall,
    'median_seconds_per_step': {
      n: float(np.median(v)) for n, v in wall.items()
    },
    'ratio': {n: r['ratio'] for n, r in ratios.items()},
    'ratio_ci': {n: r['ci'] for n, r in ratios.items()},
    'process_cpu_seconds_per_step': {
      n: float(np.median(v)) for n, v in cpu.items()
    },
  }
